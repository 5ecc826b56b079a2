"""The study's outputs from its results: a Markdown table (mean ± std over seeds), findings, a bar chart.

Spread: the sample standard deviation over seeds. A row differs from full Speeder *beyond the spread* on a
metric when the difference of the means exceeds the larger of the two rows' standard deviations. A component
*helps* when the row without it is below full Speeder beyond the spread on both HR@1 and NDCG@10, *does not
help* when on neither (the row is within the spread or above), and helps on one metric only otherwise. A
baseline is beaten by full Speeder, or beats it, when it is so on both metrics. With one seed there is no
spread and any difference counts.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speeder_rt.study.rows import Row
from speeder_rt.utils.io import atomic_path

METRICS = ("HR@1", "HR@5", "NDCG@10", "MRR")
VERDICT_METRICS = ("HR@1", "NDCG@10")
COLUMNS = (*METRICS, "train_s", "step_s")
HEADERS = {"train_s": "train s", "step_s": "s / step"}


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float  # sample std over seeds (0 for one seed)
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.std:.4f}" if self.n > 1 else f"{self.mean:.4f}"

    def seconds(self) -> str:
        return f"{self.mean:.1f} ± {self.std:.1f}" if self.n > 1 else f"{self.mean:.1f}"


def stat(values: list[float]) -> Stat:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stat(mean, std, n)


def seconds_per_step(run: Mapping[str, Any]) -> float | None:
    """A run's mean optimizer-step seconds (None for a run recorded without ``step_s``, or with no step)."""
    return run["step_s"] / run["steps"] if run.get("step_s") and run["steps"] else None


def summarize(runs: list[Mapping[str, Any]], rows: list[Row], seeds: list[int]) -> dict[str, dict[str, Stat]]:
    """Row id -> column -> Stat over the seeds that finished (rows with no finished seed are left out, and so is
    the text-item row, whose metrics are the equal-compute table's; a column no run recorded is left out)."""
    out = {}
    for row in rows:
        done = [r for r in runs if r["row"] == row.id and r["seed"] in seeds]
        if done and row.kind != "text_item":
            values = {c: [r["train_s"] if c == "train_s" else seconds_per_step(r) if c == "step_s" else r["metrics"][c]
                          for r in done] for c in COLUMNS}
            out[row.id] = {c: stat(v) for c, v in values.items() if None not in v}
    return out


def equal_compute(runs: list[Mapping[str, Any]], seeds: list[int]) -> list[str]:
    """The text-item baseline against full Speeder on the same test users, trained for the same step seconds:
    a Markdown table (empty when the text-item row has no recorded run)."""
    text = [r for r in runs if r["row"] == "text_item" and r["seed"] in seeds]
    if not text:
        return []
    full = [r for r in runs if r["row"] == "full" and r["seed"] in {t["seed"] for t in text}]
    lines = ["", "## Equal compute: full Speeder vs the text-item LLM", "",
             "Both on the same seeded test users (`text_baseline.eval_limit`); the text-item row trained until its "
             "optimizer steps took as long as full Speeder's of the same seed. Speeder's HR@1 is its VHR@1 (it always "
             "names a candidate).", "",
             "| row | users | VHR@1 | valid ratio | samples trained | step s | s / step | seeds |", "|---|" + "---:|" * 7]
    for label, done in (("Speeder (full)", full), ("text-item LLM", text)):
        if not done:
            continue
        subset = [r["subset_metrics"] for r in done]
        vhr = stat([m.get("VHR@1", m.get("HR@1")) for m in subset])
        valid = stat([m.get("valid_ratio", 1.0) for m in subset])
        users = sorted({r["subset_users"] for r in done})
        cells = [", ".join(map(str, users)), str(vhr), str(valid), stat([r["samples"] for r in done]).seconds(),
                 stat([r["step_s"] for r in done]).seconds(), str(stat([seconds_per_step(r) or 0.0 for r in done]))]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {len(done)} |")
    return lines


def compare(full: Mapping[str, Stat], row: Mapping[str, Stat]) -> dict[str, tuple[float, bool, bool]]:
    """Metric -> (row mean - full mean, row below full beyond the spread, row above full beyond the spread)."""
    out = {}
    for m in VERDICT_METRICS:
        diff = row[m].mean - full[m].mean
        spread = max(full[m].std, row[m].std)
        out[m] = (diff, diff < -spread, diff > spread)
    return out


def verdict(row: Row, full: Mapping[str, Stat], stats: Mapping[str, Stat]) -> tuple[str, str]:
    """(the table's note, the findings' sentence) for a row against full Speeder."""
    diffs = compare(full, stats)
    below = [m for m, (_, b, _) in diffs.items() if b]
    above = [m for m, (_, _, a) in diffs.items() if a]
    numbers = ", ".join(f"{m} {d:+.4f}" for m, (d, _, _) in diffs.items())
    versus = "; ".join(f"{m} {stats[m]} vs full {full[m]}" for m in VERDICT_METRICS)
    if not row.trains_speeder:
        if len(below) == len(VERDICT_METRICS):
            claim = f"Full Speeder beats {row.label} beyond the seed spread"
        elif len(above) == len(VERDICT_METRICS):
            claim = f"{row.label} beats full Speeder beyond the seed spread"
        else:
            unbeaten = " and ".join(m for m in VERDICT_METRICS if m not in below)
            claim = f"Full Speeder does not beat {row.label} beyond the seed spread on {unbeaten}"
        return f"{numbers} vs full", f"{claim}: {versus}."
    plural = " and " in row.removes
    if len(below) == len(VERDICT_METRICS):
        word, relation = ("help" if plural else "helps"), "is below full Speeder beyond the spread"
    elif not below:
        word = f"{'do' if plural else 'does'} not help on this data"
        relation = "is above full Speeder beyond the spread" if above else "is within the seed spread of full Speeder"
    else:
        word = f"{'help' if plural else 'helps'} on {' and '.join(below)} only"
        relation = f"is below full Speeder beyond the spread on {' and '.join(below)} only"
    subject = row.removes[0].upper() + row.removes[1:]
    return f"{numbers} vs full: {word}", f"{subject} {word} ({row.label} {relation}): {versus}."


def _wall_time(invocations: list[Mapping[str, Any]]) -> str:
    """The sentence on how long the invocations that ran the recorded runs took, wall clock."""
    if not invocations:
        return ""
    parts = [f"{i['runs']} run{'s' if i['runs'] != 1 else ''} in {i['wall_s'] / 60:.1f} min with --jobs {i['jobs']}"
             for i in invocations]
    total = sum(i["wall_s"] for i in invocations) / 60
    return f" Study wall time: {total:.1f} min ({'; '.join(parts)}; finished {invocations[-1]['finished']})."


def markdown(rows: list[Row], summary: Mapping[str, Mapping[str, Stat]], results: Mapping[str, Any],
             seeds: list[int], command: str, same_as: Mapping[str, str]) -> str:
    """The study's table and findings."""
    p = results.get("protocol", {})
    labels = {r.id: r.label for r in rows}
    lines = ["# Ablation study", "", f"`{command}`", "",
             f"Test split, {p.get('candidates', '?')} candidates per user (LLaRA protocol), {p.get('users', '?')} users, "
             f"{p.get('items', '?')} items, history window {p.get('history_len', '?')}"
             + (f", users with >= {p['min_interactions']} interactions" if p.get("min_interactions", 3) > 3 else "")
             + f". Mean ± std (sample std) over seeds {', '.join(map(str, seeds))}; Speeder rows at their best "
             "validation NDCG@10 checkpoint, SASRec at its best validation epoch; train s = training wall time "
             "(validation included) on this machine." + _wall_time(results.get("invocations", [])), "",
             "| row | " + " | ".join(HEADERS.get(c, c) for c in COLUMNS) + " | seeds | vs full Speeder |",
             "|---|" + "---:|" * (len(COLUMNS) + 1) + "---|"]
    full = summary.get("full")
    findings = []
    for row in rows:
        stats = summary.get(row.id)
        if stats is None:  # not run, or the text-item row (its figures are the equal-compute table's)
            ran = sum(r["row"] == row.id and r["seed"] in seeds for r in results["runs"])
            lines.append(f"| {row.label} | " + " | ".join("below" if ran else "not run" for _ in COLUMNS)
                         + f" | {ran} | |")
            continue
        note = ""
        if full is not None and row.id != "full":
            note, sentence = verdict(row, full, stats)
            findings.append(f"- {sentence}")
        cells = [("n/a" if c not in stats else stats[c].seconds() if c == "train_s" else str(stats[c])) for c in COLUMNS]
        lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {stats['HR@1'].n} | {note} |")
    if findings:
        lines += ["", "Findings (beyond the spread: the difference of the means exceeds the larger std of the two "
                      "rows):", "", *findings]
    lines += equal_compute(results["runs"], seeds)
    if same_as:
        lines += ["", "Not run separately: " + "; ".join(f"{r} (the same run as {labels.get(s, s)})"
                                                         for r, s in same_as.items()) + "."]
    return "\n".join(lines) + "\n"


def require_matplotlib() -> None:
    """The chart needs matplotlib (in the ``test`` extra); say so before a study starts, not after it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("the study's chart needs matplotlib: pip install 'speeder_rt[test]' (or pip install "
                         "matplotlib)") from None


def chart(rows: list[Row], summary: Mapping[str, Mapping[str, Stat]], path: Path, title: str) -> None:
    """Grouped bars of the metrics and bars of the training seconds, error bars = std over seeds (PNG)."""
    require_matplotlib()
    from matplotlib.figure import Figure

    shown = [r for r in rows if r.id in summary]
    fig = Figure(figsize=(max(8.0, 1.1 * len(shown) + 4.0), 7.5))
    metrics_ax, time_ax = fig.subplots(2, 1, height_ratios=(2, 1))
    width = 0.8 / len(METRICS)
    x = range(len(shown))
    for i, metric in enumerate(METRICS):
        means = [summary[r.id][metric].mean for r in shown]
        stds = [summary[r.id][metric].std for r in shown]
        metrics_ax.bar([j + (i - (len(METRICS) - 1) / 2) * width for j in x], means, width, yerr=stds, capsize=2,
                       label=metric)
    metrics_ax.set_ylabel("test metric")
    metrics_ax.set_ylim(0, 1.15)  # room for the legend above 1
    metrics_ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    metrics_ax.legend(ncols=len(METRICS), fontsize=8, loc="upper right")
    metrics_ax.set_title(title, fontsize=9)
    time_ax.bar(list(x), [summary[r.id]["train_s"].mean for r in shown],
                yerr=[summary[r.id]["train_s"].std for r in shown], capsize=2, color="tab:gray")
    time_ax.set_ylabel("training s")
    for ax in (metrics_ax, time_ax):
        ax.set_xticks(list(x), [r.label for r in shown], rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")


def write_report(out: Path, rows: list[Row], results: Mapping[str, Any], seeds: list[int], command: str,
                 same_as: Mapping[str, str]) -> tuple[str, list[Path]]:
    """``out/study.md`` and ``out/study.png``, atomically: (the Markdown, the paths)."""
    summary = summarize(results["runs"], rows, seeds)
    text = markdown(rows, summary, results, seeds, command, same_as)
    table, figure = out / "study.md", out / "study.png"
    with atomic_path(table) as tmp:
        tmp.write_text(text, encoding="utf-8")
    chart(rows, summary, figure, f"{command}\nmean ± std over seeds {', '.join(map(str, seeds))}")
    return text, [table, figure]
