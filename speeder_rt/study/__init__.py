"""The ablation study of issue #14: ``python -m speeder_rt.study --config CONFIG --out DIR``.

Every row (``rows``: full Speeder, MRC over fewer modalities, SPAE / recency / MPO off, SASRec, popularity,
random) is a set of overrides of one run config, trained and evaluated under the same protocol for each seed
(``runner``); the table, findings and chart come from the per-seed results (``report``).
"""
from speeder_rt.study.rows import Row, all_rows, study_rows
from speeder_rt.study.runner import Study, plan, read_results, run_study

__all__ = ["Row", "Study", "all_rows", "plan", "read_results", "run_study", "study_rows"]
