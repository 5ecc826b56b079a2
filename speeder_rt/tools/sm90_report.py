"""sm_90a compile report: every Triton kernel of speeder_rt, as a Hopper GPU would build it, without a GPU.

    python -m speeder_rt.tools.sm90_report [--out DIR] [--quick] [--jobs N] [--only REGEX] [--cache DIR]

1. Capture. The package's public ops run forward and backward on CPU tensors of the model's shapes (``WORKLOADS``)
   with a stand-in driver that reports the H100 / H200 target (``cuda``, capability 90, warp 32). Triton's own launch
   path binds the arguments and specialises them exactly as a launch on the GPU would (dtypes, 16-divisible and
   unit integers and pointers, constexprs, options); ``JITFunction._do_compile`` is replaced by a recorder, so
   nothing is compiled or launched in this step. An autotuned kernel is specialised once per config its pruner
   keeps (the configs the GPU would benchmark); the deterministic mode's fixed configs are captured the same way.
2. Build. Every distinct specialisation is compiled with ``triton.compile(ASTSource(...), target=sm90)`` in a pool
   of processes -- the very call Triton makes at a cache miss, so the compiled kernels land in the Triton cache
   (``TRITON_CACHE_DIR``, default ``build/sm90/triton``) under the keys a GPU launch looks up. Triton's ptxas for
   sm_90 (``ptxas-blackwell`` in Triton 3.9, ``ptxas`` in 3.6) then runs with ``-v --gpu-name=sm_90a`` for
   registers, spills and stack; ``cuobjdump -sass`` counts the SASS instructions (all, FFMA, MUFU); the TTGIR tells
   which ``tl.dot`` became wgmma (``warp_group_dot``), mma.sync (an MMAv2 layout) or FMA (a blocked layout).
3. Check. Exit status 1 on: a compile error, shared memory over ``SM90_SMEM_LIMIT`` (227 KiB) in a kept config, any
   spill in a 16-bit build, a 16-bit kernel with a ``tl.dot`` but no wgmma. The table goes to stdout and, with
   ``--out``, to ``DIR/sm90_report.md`` and ``DIR/sm90_report.json`` (written atomically).

Analysed rows are cached by the compiled kernel's hash under ``<cache>/rows``, so a rerun with a warm cache only
re-captures. ``--quick`` builds a subset that still has every kernel and every config of the 16-bit attention at
D = 128 and of the projection at the benchmark shape (``make test``); the full form is what the docs' table and
``benchmarks/gpu_check.sh``'s warm-up run.
"""
from __future__ import annotations

import argparse
import contextlib
import contextvars
import dataclasses
import datetime
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from unittest import mock

import torch

from speeder_rt.kernels._checks import SM90_SMEM_LIMIT
from speeder_rt.utils.io import atomic_path, write_json

SIXTEEN_BIT = ("bf16", "fp16")
DEFAULT_CACHE = Path("build/sm90")
_ROW_FORMAT = 1  # bump when the analysis changes: cached rows of another format are recomputed

# --------------------------------------------------------------------------------------------------------------
# Workloads: the public ops at the shapes and dtypes the model passes (configs/*.yaml; tests/test_sm90_report.py
# checks that these cover every config there). Attention: item_idx int32 and the token mask as the model passes
# them, q / k / v as HF's transposed [B, L, H, D] views, causal. Sequence lengths stand for the specialisation
# classes a prompt length falls into: 1, ragged <= 64, 64, ragged > 64, a multiple of 16 > 64 (the autotuner's
# pruner keeps only 64-wide tiles up to 64 tokens; Triton specialises integers that are 1 or multiples of 16).
# --------------------------------------------------------------------------------------------------------------
ATTENTION_SEQ_LENS = (1, 17, 64, 94, 1024)
HEAD_DIMS = (16, 32, 64, 128)
MODEL_HEADS = (14, 2)  # every backbone preset has Hq and Hq / Hkv not multiples of 16 and Hkv < Hq: one class
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (name, modality dims, d_expert, d_hidden, rows, extra table, backward): the projection as configs/*.yaml build it
# (rows = train batch x (history 10 + 20 candidates); the item-token table in chunks of min(8192, items), e.g. the
# bench config's 5,000 items, forward only) and as benchmarks/benchmark_item_token_projection.py runs it (with the
# 51-row extra table). Triton specialises S by whether it is a multiple of 16, so these cover both classes.
PROJECTION_SHAPES = (
    ("demo", (64, 64, 48), 128, 64, 1920, False, True),
    ("movielens_smollm2", (384, 64), 256, 576, 480, False, True),
    ("bench_qwen2_0p5b", (64, 64, 48), 1024, 896, 480, False, True),
    ("bench_qwen2_0p5b_table", (64, 64, 48), 1024, 896, 5000, False, False),
    ("benchmark_mome", (384, 64, 48), 1024, 896, 480, True, True),
    ("benchmark_mome_table", (384, 64, 48), 1024, 896, 8192, True, False),
    ("movielens", (384, 64), 128, 64, 1920, False, True),
)
# assemble_inputs_embeds: (batch, history width, candidates, template sizes (P, Mi, S)) of the scoring prompt
# (configs/*.yaml: 10 history items, 20 candidates; L = 40) and of a top-k prompt (no candidates; L = 64, a multiple
# of 16); d = the backbone's hidden size.
PROMPT_SHAPES = ((64, 10, 20, (4, 2, 3)), (128, 50, 0, (9, 0, 4)))
PROMPT_HIDDEN = (64, 576, 896)
BENCHMARK_ATTENTION = ((14, 2), (16, 16))  # benchmarks/benchmark_position_aware_attention.py: heads, no mask


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    dtype: str
    run: Callable[[], None]


def _attention_workload(batch: int, heads: tuple[int, int], seq_len: int, head_dim: int, dtype: torch.dtype,
                        masked: bool = True, deterministic: bool = False) -> Workload:
    def run() -> None:
        from speeder_rt.kernels import position_aware_attention, use_deterministic_kernels

        q_heads, kv_heads = heads
        gen = torch.Generator().manual_seed(seq_len)

        def hf_view(h: int) -> torch.Tensor:  # [B, L, H, D] as HF's projections produce it, seen as [B, H, L, D]
            return torch.randn(batch, seq_len, h, head_dim, generator=gen).to(dtype).transpose(1, 2)

        q, k, v = (hf_view(h).requires_grad_() for h in (q_heads, kv_heads, kv_heads))
        item_idx = torch.arange(seq_len, dtype=torch.int32).repeat(batch, 1)
        mask = torch.ones(batch, seq_len, dtype=torch.bool) if masked else None
        use_deterministic_kernels(deterministic)  # the report's process switches it nowhere else
        try:
            out = position_aware_attention(q, k, v, item_idx, torch.rand(q_heads), mask, causal=True)
            out.transpose(1, 2).sum().backward()
        finally:
            use_deterministic_kernels(False)

    flags = ("" if masked else " nomask") + (" fixed" if deterministic else "")
    return Workload(f"attn H{heads[0]}/{heads[1]} L{seq_len} D{head_dim}{flags}", _dtype_name(dtype), run)


def _projection_workload(name: str, dims: Sequence[int], d_e: int, d_h: int, rows: int, extra: bool, grad: bool,
                         dtype: torch.dtype) -> Workload:
    def run() -> None:
        from speeder_rt.kernels import ExpertParams, item_token_projection

        gen = torch.Generator().manual_seed(rows)
        num_items = 2 * rows

        def param(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)

        features = [torch.randn(num_items, d, generator=gen).half() for d in dims]  # ItemTable stores fp16
        active = torch.ones(num_items, len(dims), dtype=torch.bool)
        experts = [ExpertParams(param(d), param(d), param(d_e, d), param(d_e), param(d_h, d_e), param(d_h))
                   for d in dims]
        ids = torch.randint(-1, num_items, (rows,), generator=gen)
        extra_table = param(51, d_h) if extra else None
        extra_idx = torch.randint(-1, 51, (rows,), generator=gen) if extra else None
        with torch.set_grad_enabled(grad):
            out = item_token_projection(ids, features, active, experts, param(len(dims), sum(dims)),
                                        param(len(dims)), extra_table, extra_idx, validate=False)
            if grad:
                out.sum().backward()

    return Workload(f"proj {name} S{rows} {'fwd+bwd' if grad else 'fwd'}", _dtype_name(dtype), run)


def _prompt_workload(d: int, dtype: torch.dtype, batch: int, width: int, num_candidates: int,
                     sizes: tuple[int, int, int]) -> Workload:
    def run() -> None:
        from speeder_rt.kernels import assemble_inputs_embeds

        table = lambda rows: torch.randn(rows, d).to(dtype)  # noqa: E731
        history = torch.randint(0, 100, (batch, width))
        assemble_inputs_embeds(table(100), history, torch.full((batch,), width),
                               torch.randint(0, 100, (batch, num_candidates)), table(width + 3), table(1)[0],
                               torch.arange(sum(sizes) + 1), table(16), sizes, validate=False)

    return Workload(f"prompt d{d} B{batch} W{width} K{num_candidates}", _dtype_name(dtype), run)


def workloads(quick: bool) -> list[Workload]:
    """The full set, or for ``--quick`` every kernel with every kept config where it is the heaviest: the 16-bit
    attention at D = 128 (the register-heaviest head dim) over a long prompt, the bf16 projection at the bench
    config's shape; plus the fp32 (TF32) attention's fixed configs at D = 64 and the prompt kernel."""
    if quick:
        return [
            _attention_workload(1, MODEL_HEADS, 1024, 128, torch.bfloat16),
            _attention_workload(1, MODEL_HEADS, 94, 64, torch.float32, deterministic=True),
            _projection_workload(*PROJECTION_SHAPES[2], torch.bfloat16),
            _prompt_workload(896, torch.bfloat16, *PROMPT_SHAPES[0]),
        ]
    result = []
    for dtype in DTYPES:
        for head_dim in HEAD_DIMS:
            for seq_len in ATTENTION_SEQ_LENS:
                result.append(_attention_workload(1, MODEL_HEADS, seq_len, head_dim, dtype))
    for heads in BENCHMARK_ATTENTION:
        for head_dim in (64, 128):
            result.append(_attention_workload(2, heads, 1024, head_dim, torch.bfloat16, masked=False))
    for dtype in DTYPES:
        for shape in PROJECTION_SHAPES:
            result.append(_projection_workload(*shape, dtype))
        for d in PROMPT_HIDDEN:
            for prompt_shape in PROMPT_SHAPES:
                result.append(_prompt_workload(d, dtype, *prompt_shape))
    return result


# --------------------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Build:
    """One specialisation of one kernel: the arguments of ``triton.compile(ASTSource(...), options=...)``."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    config: str
    dtype: str
    workload: str

    @property
    def key(self) -> str:
        return repr((self.module, self.kernel, sorted(self.signature.items()), sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))

    def with_config(self, num_warps: int, num_stages: int, **blocks: int) -> Build:
        """The same specialisation with another config (``BLOCK_*`` constexprs, warps, stages): for trying configs
        that are not in a kernel's list, and for the report's own tests."""
        names = _resolve(self.module, self.kernel).arg_names
        constexprs = {**self.constexprs, **{(names.index(name),): value for name, value in blocks.items()}}
        options = {**self.options, "num_warps": num_warps, "num_stages": num_stages}
        return dataclasses.replace(self, constexprs=constexprs, options=options,
                                   config=_config_label(names, constexprs, num_warps, num_stages))


_current_workload: contextvars.ContextVar[Workload | None] = contextvars.ContextVar("workload", default=None)


def _sm90_target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


class _Sm90Driver:
    """Stands in for the CUDA driver during the capture: device 0 of an sm_90 GPU, the null stream."""

    def get_current_target(self):
        return _sm90_target()

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _config_label(names: Sequence[str], constexprs: dict, num_warps: int, num_stages: int) -> str:
    blocks = " ".join(f"{names[path[0]].removeprefix('BLOCK_')}{value}" for path, value in sorted(constexprs.items())
                      if len(path) == 1 and names[path[0]].startswith("BLOCK_"))
    return f"{blocks} w{num_warps} s{num_stages}".strip()


@contextlib.contextmanager
def capture() -> Iterator[list[Build]]:
    """Within the block, kernel launches record a ``Build`` per specialisation (per kept config for autotuned
    kernels) instead of compiling and launching; the kernels' device checks accept CPU tensors."""
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from speeder_rt.kernels import _checks

    builds: list[Build] = []
    touched: list[JITFunction] = []

    def record(fn, key, signature, device, constexprs, options, attrs, warmup):
        workload = _current_workload.get()
        touched.append(fn)
        builds.append(Build(
            module=fn.fn.__module__, kernel=fn.fn.__name__, signature=dict(signature), constexprs=dict(constexprs),
            attrs=dict(attrs), options=dict(options.__dict__),
            config=_config_label(fn.arg_names, constexprs, options.num_warps, options.num_stages),
            dtype=workload.dtype if workload else "?", workload=workload.name if workload else "?",
        ))
        return None  # run() then returns without launching

    def every_kept_config(tuner, *args, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
        tuner.nargs = None
        for config in configs:
            tuner.fn.run(*args, **kwargs, **config.all_kwargs())

    previous = driver._active  # None until a driver was first asked for (reset_active() would make one)
    driver.set_active(_Sm90Driver())
    try:
        with mock.patch.object(JITFunction, "_do_compile", record), \
                mock.patch.object(Autotuner, "run", every_kept_config), \
                mock.patch.object(_checks, "INTERPRET", True):
            yield builds
    finally:
        driver.set_active(previous)
        for fn in touched:  # drop the binders made for the stand-in target
            fn.device_caches.clear()


def collect(selected: Iterable[Workload]) -> list[Build]:
    """Distinct builds of the workloads, in first-seen order."""
    seen: dict[str, Build] = {}
    with capture() as builds:
        for workload in selected:
            token = _current_workload.set(workload)
            try:
                workload.run()
            finally:
                _current_workload.reset(token)
    for build in builds:
        seen.setdefault(build.key, build)
    return list(seen.values())


# --------------------------------------------------------------------------------------------------------------
# Build and analyse (in worker processes)
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    kernel: str
    config: str
    dtype: str
    workload: str
    error: str | None = None
    registers: int | None = None
    spill_bytes: int | None = None  # spill stores + spill loads
    stack_bytes: int | None = None
    smem_bytes: int | None = None
    wgmma_dots: int = 0
    mma_sync_dots: int = 0
    fma_dots: int = 0
    sass_instructions: int | None = None
    ffma: int | None = None
    mufu: int | None = None
    compile_s: float | None = None

    @property
    def mma(self) -> str:
        kinds = [name for name, n in (("wgmma", self.wgmma_dots), ("mma.sync", self.mma_sync_dots),
                                      ("FMA", self.fma_dots)) if n]
        return "+".join(kinds) or "-"


@functools.lru_cache
def _tools() -> tuple[str, str]:
    """(ptxas, cuobjdump): the ptxas Triton itself runs for sm_90, and the cuobjdump beside it."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    return ptxas, str(Path(ptxas).with_name("cuobjdump"))


def _ptxas_usage(ptx: str) -> tuple[dict, bytes]:
    ptxas, _ = _tools()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", str(src), "-o", str(out)], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
        log = proc.stderr
        cubin = out.read_bytes()
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log[-2000:]}")
    return dict(registers=int(regs.group(1)), stack_bytes=int(spills.group(1)),
                spill_bytes=int(spills.group(2)) + int(spills.group(3))), cubin


_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")


def _sass_counts(cubin: bytes) -> dict:
    _, cuobjdump = _tools()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True,
                              timeout=600).stdout
    ops = _SASS_LINE.findall(sass)
    return dict(sass_instructions=len(ops), ffma=ops.count("FFMA"), mufu=ops.count("MUFU"))


def dot_kinds(ttgir: str) -> dict:
    """Count the TTGIR's dots: ``ttng.warp_group_dot`` is wgmma; a ``tt.dot`` yields an MMAv2 layout (mma.sync) or
    a blocked one (FMA)."""
    mma_versions = dict(re.findall(r"^#(\w+) = #ttg\.nvidia_mma<\{versionMajor = (\d+)", ttgir, re.MULTILINE))
    counts = {"wgmma_dots": len(re.findall(r"ttng\.warp_group_dot ", ttgir)), "mma_sync_dots": 0, "fma_dots": 0}
    for result_layout in re.findall(r"= tt\.dot .*-> tensor<[^#>]*#(\w+)>", ttgir):
        version = mma_versions.get(result_layout)
        counts["wgmma_dots" if version == "3" else "mma_sync_dots" if version == "2" else "fma_dots"] += 1
    return counts


def _resolve(module: str, name: str):
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def analyse(build: Build, cache_dir: str) -> Row:
    """Compile ``build`` for sm_90a (into the Triton cache) and measure it; a failure becomes the row's error."""
    import triton
    from triton.compiler import ASTSource

    row = Row(build.kernel, build.config, build.dtype, build.workload)
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. Triton 3.9's notice about the fp-fusion default
            src = ASTSource(_resolve(build.module, build.kernel), build.signature, build.constexprs, build.attrs)
            compiled = triton.compile(src, target=_sm90_target(), options=build.options)
    except Exception as exc:  # noqa: BLE001 -- any compiler failure is a finding of the report
        row.error = f"{type(exc).__name__}: {exc}"[-3000:]
        return row
    row.compile_s = round(time.perf_counter() - start, 2)
    cached = Path(cache_dir, "rows", f"{compiled.hash}-{_ROW_FORMAT}.json")
    if cached.exists():
        measured = json.loads(cached.read_text())
    else:
        try:
            usage, cubin = _ptxas_usage(compiled.asm["ptx"])
            measured = {**usage, **_sass_counts(cubin), **dot_kinds(compiled.asm["ttgir"]),
                        "smem_bytes": int(compiled.metadata.shared)}
        except Exception as exc:  # noqa: BLE001
            row.error = f"{type(exc).__name__}: {exc}"[-3000:]
            return row
        write_json(cached, measured)
    for field, value in measured.items():
        setattr(row, field, value)
    return row


def build_all(builds: Sequence[Build], cache_dir: str, jobs: int) -> list[Row]:
    """Rows in the builds' order; ``jobs`` worker processes (spawned: no state of this process is inherited)."""
    if jobs <= 1:
        return [analyse(b, cache_dir) for b in builds]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(analyse, builds, [cache_dir] * len(builds)))


# --------------------------------------------------------------------------------------------------------------
# Check and report
# --------------------------------------------------------------------------------------------------------------
def failures(rows: Iterable[Row]) -> list[str]:
    """One line per violated condition (see the module docstring)."""
    found = []
    for r in rows:
        where = f"{r.kernel} [{r.config}] {r.dtype} ({r.workload})"
        if r.error is not None:
            found.append(f"{where}: compile error: {r.error.splitlines()[0] if r.error else ''}")
            continue
        if r.smem_bytes > SM90_SMEM_LIMIT:
            found.append(f"{where}: {r.smem_bytes} bytes of shared memory > {SM90_SMEM_LIMIT} (227 KiB) in a kept "
                         "config")
        if r.dtype in SIXTEEN_BIT and r.spill_bytes > 0:
            found.append(f"{where}: {r.spill_bytes} bytes of spills in a 16-bit build")
        has_dot = r.wgmma_dots + r.mma_sync_dots + r.fma_dots > 0
        if r.dtype in SIXTEEN_BIT and has_dot and r.wgmma_dots == 0:
            found.append(f"{where}: 16-bit matmul kernel without wgmma ({r.mma})")
    return found


_COLUMNS = ("kernel", "config", "dtype", "workload", "regs", "spill B", "stack B", "smem KiB", "dots", "SASS",
            "FFMA", "MUFU")


def _cells(r: Row) -> list[str]:
    if r.error is not None:
        return [r.kernel, r.config, r.dtype, r.workload, "error", "", "", "", "", "", "", ""]
    dots = f"{r.mma} ({r.wgmma_dots}/{r.mma_sync_dots}/{r.fma_dots})"
    return [r.kernel, r.config, r.dtype, r.workload, str(r.registers), str(r.spill_bytes), str(r.stack_bytes),
            f"{r.smem_bytes / 1024:.1f}", dots, str(r.sass_instructions), str(r.ffma), str(r.mufu)]


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def summary_table(rows: Sequence[Row]) -> str:
    """Markdown: one line per (kernel, dtype, head dim of attention workloads, config) with the worst figures over
    its builds (the other shape parameters)."""
    groups: dict[tuple[str, str, str, str], list[Row]] = {}
    for r in rows:
        head_dim = re.search(r" D(\d+)", r.workload)
        groups.setdefault((r.kernel, r.dtype, head_dim.group(1) if head_dim else "-", r.config), []).append(r)
    lines = ["| kernel | dtype | D | config | builds | max regs | max spill B | max smem KiB | dots | max SASS | "
             "max FFMA |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, dtype, head_dim, config), group in sorted(groups.items(), key=lambda g: (
            g[0][0], g[0][1], int(g[0][2]) if g[0][2].isdigit() else 0, g[0][3])):
        built = [r for r in group if r.error is None]
        head = f"| {kernel} | {dtype} | {head_dim} | {config} | {len(group)} |"
        if len(built) < len(group):
            lines.append(f"{head} {len(group) - len(built)} compile errors | | | | | |")
        if built:
            dots = "/".join(sorted({r.mma for r in built}))
            lines.append(f"{head} {max(r.registers for r in built)} | {max(r.spill_bytes for r in built)} | "
                         f"{max(r.smem_bytes for r in built) / 1024:.1f} | {dots} | "
                         f"{max(r.sass_instructions for r in built)} | {max(r.ffma for r in built)} |")
    return "\n".join(lines)


def text_table(rows: Sequence[Row]) -> str:
    table = [list(_COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def _environment() -> dict:
    import triton

    ptxas, _ = _tools()
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return dict(date=datetime.date.today().isoformat(), triton=triton.__version__, torch=torch.__version__,
                ptxas=f"{Path(ptxas).name} ({version})", target="sm_90a")


def write_report(out_dir: Path, rows: Sequence[Row], found: Sequence[str], meta: dict) -> None:
    env = ", ".join(f"{k} {v}" for k, v in meta.items())
    md = [f"# sm_90a compile report\n\n{env}\n", "## Failures\n", *(f"- {f}" for f in found or ["none"]), "",
          "## Per kernel, config and dtype (worst over the shapes)\n", summary_table(rows), "",
          "## Every build\n", markdown_table(rows)]
    with atomic_path(out_dir / "sm90_report.md") as tmp:
        tmp.write_text("\n".join(md) + "\n", encoding="utf-8")
    write_json(out_dir / "sm90_report.json",
               dict(meta=meta, failures=list(found), rows=[dataclasses.asdict(r) for r in rows]))


def run(builds: Sequence[Build], cache_dir: Path, jobs: int, out_dir: Path | None, meta: dict) -> int:
    """Build, print, write; the exit status (1 when any condition fails)."""
    os.environ.setdefault("TRITON_CACHE_DIR", str((cache_dir / "triton").resolve()))
    start = time.perf_counter()
    rows = build_all(builds, str(cache_dir.resolve()), jobs)
    found = failures(rows)
    meta = {**_environment(), **meta, "builds": len(rows), "wall_s": round(time.perf_counter() - start, 1)}
    print(text_table(rows))
    print(", ".join(f"{k} {v}" for k, v in meta.items()))
    if out_dir is not None:
        write_report(out_dir, rows, found, meta)
    for line in found:
        print(f"FAIL {line}", file=sys.stderr)
    print(f"sm90 report: {'FAIL' if found else 'PASS'} ({len(found)} failures)")
    return 1 if found else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m speeder_rt.tools.sm90_report",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="write sm90_report.md / .json into this directory")
    parser.add_argument("--quick", action="store_true", help="the subset make test runs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    parser.add_argument("--only", default=None, help="only kernels whose name matches this regex")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="Triton cache (unless TRITON_CACHE_DIR is set) and analysed rows (default build/sm90)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from speeder_rt.kernels._checks import INTERPRET

    if INTERPRET:
        parser.error("TRITON_INTERPRET=1 replaces the kernels by the interpreter; run the report without it")
    builds = collect(workloads(args.quick))
    if args.only:
        builds = [b for b in builds if re.search(args.only, b.kernel)]
    print(f"{len(builds)} distinct builds to compile for sm_90a", flush=True)
    return run(builds, args.cache, args.jobs, args.out, dict(form="quick" if args.quick else "full"))


if __name__ == "__main__":
    sys.exit(main())
