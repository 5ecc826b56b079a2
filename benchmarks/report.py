"""The ratio report of one benchmark session: medians -> ratios -> report.json, report.md, report.png, summary.txt.

``build(results, meta)`` computes, from the suites' medians of the same run:

* training: baseline step / Speeder step per (history, fine-tune mode), with both peak memories;
* inference: baseline request / Speeder request per (history, batch), also against the optimized runtime;
* runtime: naive Speeder / optimized Speeder per (history, batch);
* batch-1 latency of every method and recommendations/s of every method at its largest batch;
* claims (CUDA only): training speedup >= 2.5x and inference speedup >= 4.0x in every measured case.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from speeder_rt.utils.io import atomic_path

CLAIMS = {"training": 2.5, "inference": 4.0}  # the paper's speedups over MLLM-based recommenders
# (suite, method) -> the name a method goes by in the report
METHODS = {("inference", "speeder"): "speeder", ("runtime", "optimized"): "speeder_optimized",
           ("runtime", "naive"): "speeder_naive", ("inference", "text_baseline"): "text_baseline"}


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 4)


def build(results: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """The report: ``meta``, every result, the ratio tables and the claims check."""
    index = {(r["suite"], r["method"], r["variant"], r["history"], r["batch"]): r for r in results}
    keys = sorted({(r["suite"], r["variant"], r["history"], r["batch"]) for r in results})

    def pair(suite: str, a: str, b: str) -> Iterable[tuple[str, int, int, dict, dict]]:
        for s, variant, history, batch in keys:
            ra, rb = index.get((s, a, variant, history, batch)), index.get((s, b, variant, history, batch))
            if s == suite and ra and rb:
                yield variant, history, batch, ra, rb

    training = [{
        "history": h, "finetune": v, "batch": b, "speeder_ms": _ms(s["median_s"]), "baseline_ms": _ms(t["median_s"]),
        "speedup": t["median_s"] / s["median_s"], "speeder_peak_mib": s.get("peak_memory_mib"),
        "baseline_peak_mib": t.get("peak_memory_mib"), "speeder_prompt_tokens": s.get("prompt_tokens"),
        "baseline_prompt_tokens": t.get("prompt_tokens"),
    } for v, h, b, s, t in pair("training", "speeder", "text_baseline")]
    inference = []
    for _, h, b, s, t in pair("inference", "speeder", "text_baseline"):
        opt = index.get(("runtime", "optimized", "request", h, b))
        inference.append({
            "history": h, "batch": b, "speeder_ms": _ms(s["median_s"]), "baseline_ms": _ms(t["median_s"]),
            "speedup": t["median_s"] / s["median_s"], "optimized_ms": opt and _ms(opt["median_s"]),
            "speedup_optimized": opt and t["median_s"] / opt["median_s"],
            "baseline_mean_generated_tokens": t.get("mean_generated_tokens"),
            "speeder_prompt_tokens": s.get("prompt_tokens"), "baseline_prompt_tokens": t.get("prompt_tokens"),
        })
    runtime = [{"history": h, "batch": b, "naive_ms": _ms(n["median_s"]), "optimized_ms": _ms(o["median_s"]),
                "speedup": n["median_s"] / o["median_s"]} for _, h, b, o, n in pair("runtime", "optimized", "naive")]

    latency, throughput = [], []
    for (suite, method), name in METHODS.items():
        rows = [r for r in results if r["suite"] == suite and r["method"] == method]
        for h in sorted({r["history"] for r in rows}):
            mine = [r for r in rows if r["history"] == h]
            latency += [{"history": h, "method": name, "ms": _ms(r["median_s"])} for r in mine if r["batch"] == 1]
            top = max(mine, key=lambda r: r["batch"])
            throughput.append({"history": h, "method": name, "batch": top["batch"],
                               "recs_per_s": top["batch"] / top["median_s"]})

    latency.sort(key=lambda x: x["history"])  # stable: methods stay in METHODS order within a history
    throughput.sort(key=lambda x: x["history"])
    failures = []
    if meta.get("device") == "cuda":
        failures += [f"training speedup {r['speedup']:.2f}x < {CLAIMS['training']}x (history {r['history']}, "
                     f"{r['finetune']}, batch {r['batch']})" for r in training if r["speedup"] < CLAIMS["training"]]
        failures += [f"inference speedup {r['speedup']:.2f}x < {CLAIMS['inference']}x (history {r['history']}, "
                     f"batch {r['batch']})" for r in inference if r["speedup"] < CLAIMS["inference"]]
    return {
        "meta": meta,
        "results": results,
        "ratios": {"training": training, "inference": inference, "runtime": runtime,
                   "latency_batch1": latency, "throughput_largest_batch": throughput},
        "claims": {"thresholds": CLAIMS, "checked": meta.get("device") == "cuda", "failures": failures},
    }


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table, formatted."""
    r = report["ratios"]
    out = [
        ("Training step: text baseline / Speeder", ["history", "finetune", "batch", "speeder ms", "baseline ms",
                                                    "speedup", "speeder MiB", "baseline MiB", "tokens S/B"],
         [[_fmt(x["history"]), x["finetune"], _fmt(x["batch"]), _fmt(x["speeder_ms"]), _fmt(x["baseline_ms"]),
           _fmt(x["speedup"]) + "x", _fmt(x["speeder_peak_mib"], 0), _fmt(x["baseline_peak_mib"], 0),
           f"{x['speeder_prompt_tokens']}/{x['baseline_prompt_tokens']}"] for x in r["training"]]),
        ("Inference request: text baseline / Speeder", ["history", "batch", "speeder ms", "optimized ms",
                                                        "baseline ms", "speedup", "vs optimized", "gen tokens"],
         [[_fmt(x["history"]), _fmt(x["batch"]), _fmt(x["speeder_ms"]), _fmt(x["optimized_ms"]), _fmt(x["baseline_ms"]),
           _fmt(x["speedup"]) + "x", _fmt(x["speedup_optimized"]) + ("x" if x["speedup_optimized"] else ""),
           _fmt(x["baseline_mean_generated_tokens"], 1)] for x in r["inference"]]),
        ("Runtime: naive Speeder / OptimizedSpeeder", ["history", "batch", "naive ms", "optimized ms", "speedup"],
         [[_fmt(x["history"]), _fmt(x["batch"]), _fmt(x["naive_ms"]), _fmt(x["optimized_ms"]), _fmt(x["speedup"]) + "x"]
          for x in r["runtime"]]),
        ("Batch-1 latency", ["history", "method", "ms"],
         [[_fmt(x["history"]), x["method"], _fmt(x["ms"], 3)] for x in r["latency_batch1"]]),
        ("Recommendations/s at the largest batch", ["history", "method", "batch", "recs/s"],
         [[_fmt(x["history"]), x["method"], _fmt(x["batch"]), _fmt(x["recs_per_s"], 0)]
          for x in r["throughput_largest_batch"]]),
    ]
    return [t for t in out if t[2]]


def headline(report: dict[str, Any]) -> list[str]:
    m = report["meta"]
    lines = [(f"Speeder vs text-item baseline: shape {m['shape']}, {m['dtype']}, {m['device_name']}; "
              f"{m['candidates']} candidates, titles of {m['title_tokens']} tokens, generation cap "
              f"{m['max_new_tokens']} new tokens, training batch {m['train_batch']}; random init")]
    if m["device"] != "cuda":
        b = m["batches"]
        lines.append(f"CPU run, information only (no claims checked): shared machine, {m['threads']} intra-op "
                     f"thread(s); batches {', '.join(map(str, b['inference']))} (inference) and "
                     f"{', '.join(map(str, b['runtime']))} (runtime) instead of CUDA's 1, 16, 128 and 1, 16, 128, 256")
    lines.append(f"memory: {m['memory']}")
    return lines


def claims_lines(report: dict[str, Any]) -> list[str]:
    claims = report["claims"]
    t = claims["thresholds"]
    head = f"claims (training >= {t['training']}x, inference >= {t['inference']}x)"
    if not claims["checked"]:
        return [f"{head}: not checked on CPU"]
    if not claims["failures"]:
        return [f"{head}: PASS"]
    return [f"{head}: FAIL"] + [f"  {f}" for f in claims["failures"]]


def text(report: dict[str, Any]) -> str:
    """The compact table printed at the end of the session (and written as summary.txt)."""
    lines = headline(report)
    for title, header, rows in tables(report):
        widths = [max(len(c) for c in col) for col in zip(header, *rows)]
        lines += ["", title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines + [""] + claims_lines(report)) + "\n"


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Speeder benchmark report", ""] + [f"- {line}" for line in headline(report)]
    for title, header, rows in tables(report):
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", "## Claims", ""] + [f"- {line.strip()}" for line in claims_lines(report)]
    lines += ["", "## Definitions", "",
              "- training step: forward, backward and AdamW step on the same request batch; Speeder's listwise "
              "loss (one token per item) vs the baseline's causal-LM loss on the target title after a title prompt",
              "- inference request: history + candidates -> chosen item. Speeder: one forward pass with the "
              "precomputed item-token table; optimized: `OptimizedSpeeder` (buckets, CUDA graphs); baseline: "
              "prefill + greedy title generation up to the cap (prompt building and title matching not timed)",
              "- runtime: naive = `SpeederModel` with the reference attention backend, MoME tokens every call",
              "", "Medians of one session; ratios are computed within it. Chart: report.png.", ""]
    return "\n".join(lines)


def chart(report: dict[str, Any], path: Path) -> None:
    """Bar charts of the speedups (log scale past 10x), with the paper's claims as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    r = report["ratios"]
    panels = [
        ("training: baseline / Speeder", [(f"h{x['history']} {x['finetune']}", x["speedup"]) for x in r["training"]],
         CLAIMS["training"]),
        ("inference: baseline / Speeder (green: optimized)",
         [(f"h{x['history']} b{x['batch']}", x["speedup"]) for x in r["inference"]]
         + [(f"h{x['history']} b{x['batch']} opt", x["speedup_optimized"]) for x in r["inference"]
            if x["speedup_optimized"]],
         CLAIMS["inference"]),
        ("runtime: naive / optimized", [(f"h{x['history']} b{x['batch']}", x["speedup"]) for x in r["runtime"]], None),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (title, bars, claim) in zip(axes, panels):
        ax.set_title(title)
        if bars:
            labels, values = zip(*bars)
            colors = ["tab:green" if label.endswith("opt") else "tab:blue" for label in labels]
            ax.bar(range(len(values)), values, color=colors)
            ax.set_xticks(range(len(values)), labels, rotation=45, ha="right", fontsize=8)
            for i, v in enumerate(values):
                ax.annotate(f"{v:.1f}x", (i, v), ha="center", va="bottom", fontsize=8)
            if max(values) > 10:
                ax.set_yscale("log")
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
            ax.margins(y=0.2)
        if claim:
            ax.axhline(claim, color="tab:red", linestyle="--", label=f"paper claim {claim}x")
            ax.legend(fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel("speedup")
    fig.suptitle(headline(report)[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def write(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """report.json, report.md, report.png and summary.txt in ``out_dir`` (created)."""
    paths = [out_dir / name for name in ("report.json", "report.md", "report.png", "summary.txt")]
    writers = (lambda f: f.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8"),
               lambda f: f.write_text(markdown(report), encoding="utf-8"),
               lambda f: chart(report, f),
               lambda f: f.write_text(text(report), encoding="utf-8"))
    for path, write_to in zip(paths, writers):
        with atomic_path(path) as tmp:  # an interrupted run never leaves a truncated report
            write_to(tmp)
    return paths
