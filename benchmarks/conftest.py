"""Options of the Speeder-vs-baseline suites and the end-of-session ratio report.

Options: ``--bench-shape`` (default qwen2-0.5b with CUDA, else tiny), ``--bench-history`` (comma-separated, e.g.
``10,50``), ``--bench-title-tokens`` (32), ``--bench-max-new-tokens`` (16), ``--bench-train-batch`` (16),
``--bench-report DIR`` (default ``$OUT`` if set, else ``bench_out/``). At the end of a session that ran any of the
suites, the ratio table is printed last and written (report.json / .md / .png, summary.txt); on CUDA the session
fails when Speeder's training speedup is below 2.5x or its inference speedup below 4.0x in any measured case.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the GPU image runs the package from the source tree
    sys.path.insert(0, str(ROOT))

if not torch.cuda.is_available():
    # The kernel benchmarks' CPU smoke cases need Triton's interpreter; they set TRITON_INTERPRET=1 when imported,
    # but importing the suites' builders (transformers, peft) imports Triton first, so set it before that.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # A shared 2-core machine stalls OpenMP's parallel regions (a small matmul takes 15 ms instead of 15 us when
    # the other core is busy), so CPU timings use one intra-op thread.
    torch.set_num_threads(1)

# Scripts that need an optional extra the machine lacks (the GPU image has no faiss-cpu) are not collected.
collect_ignore = [] if importlib.util.find_spec("faiss") else ["benchmark_catalog.py"]

import common  # noqa: E402
import report  # noqa: E402

from speeder_rt.model.backbone import SHAPES  # noqa: E402
from speeder_rt.model.speeder import SpeederConfig  # noqa: E402

_REPORT = pytest.StashKey[tuple[dict, list[Path]]]()
MAX_HISTORY = SpeederConfig.max_history  # the default recency table size


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("speeder benchmarks")
    group.addoption("--bench-shape", choices=sorted(SHAPES), default=None,
                    help="backbone shape preset, random init (default: qwen2-0.5b with CUDA, else tiny)")
    group.addoption("--bench-history", default="10", help="history lengths, comma-separated (default 10; e.g. 10,50)")
    group.addoption("--bench-title-tokens", type=int, default=32, help="tokens per item title (default 32)")
    group.addoption("--bench-max-new-tokens", type=int, default=16, help="text-baseline generation cap (default 16)")
    group.addoption("--bench-train-batch", type=int, default=16, help="training batch size (default 16)")
    group.addoption("--bench-report", default=None, help="report directory (default: $OUT if set, else bench_out/)")


def _histories(config: pytest.Config) -> list[int]:
    raw = config.getoption("--bench-history")
    try:
        values = sorted({int(v) for v in raw.split(",") if v.strip()})
    except ValueError:
        raise pytest.UsageError(f"--bench-history: comma-separated integers expected, got {raw!r}") from None
    if not values or not 1 <= values[0] <= values[-1] <= MAX_HISTORY:
        raise pytest.UsageError(f"--bench-history: values in 1..{MAX_HISTORY} expected, got {raw!r}")
    return values


def _shape(config: pytest.Config) -> str:
    return config.getoption("--bench-shape") or ("qwen2-0.5b" if common.CUDA else "tiny")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "history" in metafunc.fixturenames:
        metafunc.parametrize("history", _histories(metafunc.config), ids=lambda h: f"h{h}")


@pytest.fixture(scope="session")
def settings(pytestconfig: pytest.Config) -> common.Settings:
    return common.Settings(
        shape=_shape(pytestconfig),
        title_tokens=pytestconfig.getoption("--bench-title-tokens"),
        max_new_tokens=pytestconfig.getoption("--bench-max-new-tokens"),
        train_batch=pytestconfig.getoption("--bench-train-batch"),
    )


@pytest.fixture(autouse=True)
def _release_models(request: pytest.FixtureRequest):
    """Free what a suite test dropped (a training copy, its optimizer) before the next one measures memory."""
    yield
    if "settings" in request.fixturenames:
        common.release()


def _meta(config: pytest.Config) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    device_name = torch.cuda.get_device_name(0) if common.CUDA else f"CPU ({os.cpu_count()} cores)"
    return {
        "shape": _shape(config),
        "dtype": common.DTYPE, "device": common.DEVICE.type, "device_name": device_name,
        "histories": _histories(config), "candidates": common.NUM_CANDIDATES,
        "title_tokens": config.getoption("--bench-title-tokens"),
        "max_new_tokens": config.getoption("--bench-max-new-tokens"),
        "train_batch": config.getoption("--bench-train-batch"),
        "batches": {"inference": list(common.INFERENCE_BATCHES), "runtime": list(common.RUNTIME_BATCHES)},
        "memory": "peak CUDA memory allocated (max_memory_allocated after reset)" if common.CUDA
        else "process peak RSS (session high-water mark, not per benchmark)",
        "threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "triton": triton_version},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _report_dir(config: pytest.Config) -> Path:
    chosen = config.getoption("--bench-report") or os.environ.get("OUT")
    return Path(chosen) if chosen else ROOT / "bench_out"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not common.RESULTS:
        return
    rep = report.build(common.RESULTS, _meta(session.config))
    session.config.stash[_REPORT] = rep, report.write(rep, _report_dir(session.config))
    if rep["claims"]["failures"]:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the ratio table is the last thing printed
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _REPORT not in config.stash:
        return
    rep, paths = config.stash[_REPORT]
    terminalreporter.section("Speeder ratios")
    terminalreporter.write_line(f"report: {', '.join(str(p) for p in paths)}")
    terminalreporter.write(report.text(rep))
    if rep["claims"]["failures"]:
        terminalreporter.write_line("SESSION FAILED: Speeder misses the paper's speedup claims on this GPU (see above)",
                                    red=True, bold=True)
