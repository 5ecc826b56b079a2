"""The sm_90a compile report (speeder_rt.tools.sm90_report): its workloads cover the shipped configs, its capture
matches the launch path, and every failure condition it names makes it fail on a real compiled build.

The report compiles real kernels, which the interpreter replaces, so these tests run it in a subprocess without
TRITON_INTERPRET (Triton's cache and the analysed rows are shared with ``make test``'s quick report, build/sm90).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from speeder_rt.baselines.sasrec import SASRecConfig
from speeder_rt.data.features import TEXT_DIM
from speeder_rt.data.synthetic import SyntheticConfig
from speeder_rt.kernels._checks import SM90_SMEM_LIMIT
from speeder_rt.model.backbone import SHAPES
from speeder_rt.tools import sm90_report
from speeder_rt.train.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "build" / "sm90"
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _compiler_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(CACHE / "triton")
    return env


def _run_python(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=_compiler_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_workloads_cover_the_configs(config):
    """The report's attention classes, projection shapes and prompts include what each shipped config builds."""
    run = load_run_config(config)
    backbone = run.model.backbone
    shape = SHAPES["smollm2-135m" if backbone.gguf_file == "smollm2" else backbone.shape]
    heads, kv_heads = shape["num_heads"], shape["num_kv_heads"]
    assert shape["hidden_size"] // heads in sm90_report.HEAD_DIMS
    model_q, model_kv = sm90_report.MODEL_HEADS  # same specialisation class: Hq and the group not 1, not % 16
    for q, group in ((heads, heads // kv_heads), (model_q, model_q // model_kv)):
        assert q % 16 != 0 and group != 1 and group % 16 != 0
    assert _DTYPE_NAMES[backbone.dtype] in {sm90_report._dtype_name(d) for d in sm90_report.DTYPES}
    synthetic = run.data.source == "synthetic"
    widths = {"text": SyntheticConfig().text_dim if synthetic else TEXT_DIM, "collab": SASRecConfig().hidden,
              "image": SyntheticConfig().image_dim}
    dims = tuple(widths[m] for m in run.model.modalities)
    assert any(s[1:4] == (dims, run.model.d_expert, shape["hidden_size"]) for s in sm90_report.PROJECTION_SHAPES)
    assert shape["hidden_size"] in sm90_report.PROMPT_HIDDEN
    split = run.data.split
    assert any((w, k) == (split.history_len, split.num_candidates) for _, w, k, _ in sm90_report.PROMPT_SHAPES)


def test_quick_report_cli():
    """The CLI on one kernel: exit 0, the table printed, both files written, every row measured."""
    out_dir = CACHE / "test_cli"
    proc = subprocess.run([sys.executable, "-m", "speeder_rt.tools.sm90_report", "--quick", "--jobs", "1",
                           "--only", "^_assemble_kernel$", "--out", str(out_dir), "--cache", str(CACHE)],
                          cwd=ROOT, env=_compiler_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sm90 report: PASS" in proc.stdout and "_assemble_kernel" in proc.stdout
    report = json.loads((out_dir / "sm90_report.json").read_text())
    assert report["meta"]["target"] == "sm_90a" and report["failures"] == []
    assert report["rows"] and all(r["kernel"] == "_assemble_kernel" and r["registers"] > 0 for r in report["rows"])
    assert "| _assemble_kernel |" in (out_dir / "sm90_report.md").read_text()


def test_interpreter_is_refused():
    proc = subprocess.run([sys.executable, "-m", "speeder_rt.tools.sm90_report", "--quick"], cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr


_FAILURE_PATHS = """
    import dataclasses, json, torch
    import importlib
    from pathlib import Path
    from speeder_rt.tools import sm90_report as r

    paa = importlib.import_module("speeder_rt.kernels.position_aware_attention")

    def fixed_forward(head_dim):
        workload = r._attention_workload(1, r.MODEL_HEADS, 1024, head_dim, torch.bfloat16, deterministic=True)
        (build,) = [b for b in r.collect([workload]) if b.kernel == "_pa_attn_fwd_kernel"]
        return build

    fwd128, fwd64 = fixed_forward(128), fixed_forward(64)
    cases = {
        "kept": fwd128,  # the fixed config the package ships
        "over_smem": fwd128.with_config(8, 4, BLOCK_M=128, BLOCK_N=128),
        "two_warps": fwd64.with_config(2, 2, BLOCK_M=32, BLOCK_N=32),  # wgmma needs a warp group of 4
        "bad_blocks": fwd64.with_config(4, 2, BLOCK_M=64, BLOCK_N=128),  # violates BLOCK_M % BLOCK_N == 0
        # 128 x 128 fp32 scores and a 128 x 128 accumulator on one warp group: more than 255 registers a thread
        "spilling": fwd128.with_config(4, 1, BLOCK_M=128, BLOCK_N=128),
    }
    rows = r.build_all(list(cases.values()), str(Path("build/sm90").resolve()), 2)
    status = r.run(list(cases.values())[1:], Path("build/sm90"), 2, None, {})
    print("RESULT " + json.dumps(dict(
        rows={name: dataclasses.asdict(row) for name, row in zip(cases, rows)},
        failures={name: r.failures([row]) for name, row in zip(cases, rows)},
        status=status,
        estimate=paa.smem_estimate("fwd", paa._FWD_BY_D[128][0], 128, 2),
        smem_limit=r.SM90_SMEM_LIMIT,
    )))
"""


@pytest.fixture(scope="module")
def failure_paths() -> dict:
    proc = _run_python(_FAILURE_PATHS)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_kept_config_passes(failure_paths):
    row = failure_paths["rows"]["kept"]
    assert row["error"] is None and row["wgmma_dots"] > 0 and row["spill_bytes"] == 0
    assert failure_paths["failures"]["kept"] == []
    # the pruner's shared-memory estimate is within 2 KiB of what Triton allocates
    assert abs(row["smem_bytes"] - failure_paths["estimate"]) <= 2048


def test_shared_memory_over_the_limit_fails(failure_paths):
    row = failure_paths["rows"]["over_smem"]
    assert row["error"] is None and row["smem_bytes"] > SM90_SMEM_LIMIT == failure_paths["smem_limit"]
    assert any("shared memory" in f for f in failure_paths["failures"]["over_smem"])


def test_sixteen_bit_kernel_without_wgmma_fails(failure_paths):
    row = failure_paths["rows"]["two_warps"]
    assert row["error"] is None and row["wgmma_dots"] == 0 and row["mma_sync_dots"] + row["fma_dots"] > 0
    assert any("without wgmma" in f for f in failure_paths["failures"]["two_warps"])


def test_compile_error_fails(failure_paths):
    row = failure_paths["rows"]["bad_blocks"]
    assert row["error"] and row["registers"] is None
    assert any("compile error" in f for f in failure_paths["failures"]["bad_blocks"])


def test_failing_builds_make_the_exit_status_1(failure_paths):
    assert failure_paths["status"] == 1


def test_spill_in_sixteen_bit_build_fails_and_fp32_spill_does_not(failure_paths):
    """A real build whose tiles need more than 255 registers spills and fails; the spill condition applies to
    16-bit builds only (the same measured row labelled fp32 passes)."""
    row = failure_paths["rows"]["spilling"]
    assert row["error"] is None and row["registers"] == 255 and row["spill_bytes"] > 0
    assert any("spills" in f for f in failure_paths["failures"]["spilling"])
    assert sm90_report.failures([sm90_report.Row(**{**row, "dtype": "fp32"})]) == []


_GPU_TESTS_PRECOMPILED = """
    import json, sys
    sys.path.insert(0, "tests")
    import test_assemble_inputs_embeds as prompt
    import test_item_token_projection as projection
    import test_position_aware_attention as attention
    from speeder_rt.tools import sm90_report as r

    precompiled = {b.key for b in r.collect(r.workloads(quick=False))}
    with r.capture() as launched:  # every kept config of every autotuned launch: what the GPU tests can run
        for case in attention.GPU_CASES:
            attention._kernel_result(case, attention.hf_inputs(case, "cpu"))
        for case in projection.GPU_CASES:
            projection._forward_backward(projection.item_token_projection, projection._make_inputs(case, "cpu"))
        for case in prompt.GPU_CASES:
            prompt.assemble_inputs_embeds(**prompt._make_inputs(case, "cpu"))
    missing = sorted({f"{b.kernel} [{b.config}] {b.signature}" for b in launched if b.key not in precompiled})
    print("RESULT " + json.dumps(dict(launched=len(launched), missing=missing)))
"""


@pytest.mark.slow
def test_gpu_tests_launch_only_precompiled_builds():
    """Every specialisation the kernels' gpu-marked tests launch (any config the autotuner or the forced-config
    tests may run) is one the full report compiles, so after gpu_check.sh's precompile they never compile."""
    proc = _run_python(_GPU_TESTS_PRECOMPILED)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["launched"] > 0 and result["missing"] == [], result["missing"][:5]
