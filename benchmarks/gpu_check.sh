#!/usr/bin/env bash
# One command for a lent GPU (H100 / H200), within 10 minutes on a cold machine: first the full sm_90a compile report
# (speeder_rt.kernels.sm90_report on every core: every kernel x config x dtype x shape the tests, suites and
# benchmarks launch, compiled into this run's Triton cache, so the timed steps never wait on the compiler), then
# the gpu-marked tests, the Speeder-vs-baseline suites (qwen2-0.5b, histories 10 and 50) with their ratio report,
# then the kernel benchmarks (attention sweep first). Installs nothing and runs from the source tree (PYTHONPATH =
# repo root). Every step has its own timeout and is interrupted with SIGINT, so pytest still writes what it
# measured. Writes into $OUT (or bench_out/):
#   report.json  report.md  report.png  summary.txt  sm90_report.md  logs.tar.gz (step logs, environment,
#   benchmark JSON, the sm90 report's JSON, Triton autotuning output and kernel metadata)
# and prints the summary table last. Without CUDA it runs the CPU-sized version: tiny shape, and the gpu-marked
# tests under TRITON_INTERPRET=1 (they skip). Exit status 1 if any step failed, timed out, or missed the claims.
# Step timeouts (seconds) can be overridden: T_PRECOMPILE, T_TESTS, T_SUITES, T_KERNELS. The Triton cache is
# $TRITON_CACHE_DIR, by default a directory of this run (kept until the script ends).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
OUT_DIR="${OUT:-$ROOT/bench_out}"
LOGS="$(mktemp -d)"
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/{report.json,report.md,report.png,summary.txt,sm90_report.md,logs.tar.gz}  # never a stale run
touch "$LOGS/.start"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$LOGS/triton_cache_dir}"

if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi

if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    MODE=gpu SHAPE=qwen2-0.5b
    export TRITON_PRINT_AUTOTUNING=1
    T_PRECOMPILE="${T_PRECOMPILE:-240}" T_TESTS="${T_TESTS:-150}"
    T_SUITES="${T_SUITES:-150}" T_KERNELS="${T_KERNELS:-60}"  # 600 s of limits: the 10-minute budget
else
    MODE=cpu SHAPE=tiny
    T_PRECOMPILE="${T_PRECOMPILE:-600}" T_TESTS="${T_TESTS:-300}"
    T_SUITES="${T_SUITES:-300}" T_KERNELS="${T_KERNELS:-120}"
fi

STATUS=()
FAILED=0
step() {  # name timeout_s command...: run with a timeout, log to $LOGS/name.log, record rc and time
    local name=$1 limit=$2 start=$SECONDS rc note=""
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$LOGS/$name.log"
    timeout -s INT -k 20 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
    rc=$?
    case $rc in 0) ;; 124|137) note=" (timed out)"; FAILED=1 ;; *) FAILED=1 ;; esac
    STATUS+=("$(printf '%-8s rc=%-3s %4ss%s' "$name" "$rc" "$((SECONDS - start))" "$note")")
    tail -n 3 "$LOGS/$name.log"
}

{
    echo "mode: $MODE  shape: $SHAPE  python: $PY  root: $ROOT  date: $(date -Is)"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit,mig.mode.current --format=csv
    fi
    "$PY" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| cuda', torch.version.cuda, '| transformers', transformers.__version__)"
    "$PY" -c "import triton; print('triton', triton.__version__)" || echo "triton: not importable"
    "$PY" -c "import peft, pytest_benchmark; print('peft', peft.__version__, '| pytest-benchmark', pytest_benchmark.__version__)"
} >"$LOGS/environment.txt" 2>&1

SUITES=(benchmarks/benchmark_training.py benchmarks/benchmark_inference.py benchmarks/benchmark_runtime.py)
KERNELS=(benchmarks/benchmark_position_aware_attention.py)
for f in benchmarks/benchmark_*.py; do
    case " ${SUITES[*]} ${KERNELS[*]} " in *" $f "*) ;; *) KERNELS+=("$f") ;; esac
done
PYTEST=("$PY" -m pytest -p no:cacheprovider -rs)

# The compile report runs the same on a CPU-only machine (it needs no GPU); there the quick form, in the time limit.
if [ "$MODE" = gpu ]; then REPORT_FORM=(); else REPORT_FORM=(--quick); fi
step precompile "$T_PRECOMPILE" env -u TRITON_INTERPRET "$PY" -m speeder_rt.kernels.sm90_report "${REPORT_FORM[@]}" \
    --jobs "$(nproc)" --out "$LOGS/sm90"
cp "$LOGS/sm90/sm90_report.md" "$OUT_DIR/" 2>/dev/null

if [ "$MODE" = gpu ]; then
    step tests "$T_TESTS" "${PYTEST[@]}" -m gpu tests
else
    step tests "$T_TESTS" env TRITON_INTERPRET=1 "${PYTEST[@]}" -m gpu tests
fi
step suites "$T_SUITES" "${PYTEST[@]}" "${SUITES[@]}" --benchmark-only --bench-shape "$SHAPE" \
    --bench-history 10,50 --bench-report "$OUT_DIR" --benchmark-json "$LOGS/suites.json"
step kernels "$T_KERNELS" "${PYTEST[@]}" "${KERNELS[@]}" --benchmark-only --benchmark-json "$LOGS/kernels.json"

if [ "$MODE" = gpu ]; then  # Triton's compile metadata of this run's kernels (warps, stages, shared memory)
    mkdir -p "$LOGS/triton_cache"
    find "$TRITON_CACHE_DIR" -name '*.json' -newer "$LOGS/.start" \
        -exec cp --backup=numbered -t "$LOGS/triton_cache" {} + 2>/dev/null
fi
rm -rf "$LOGS/.start" "$LOGS/triton_cache_dir"
tar -czf "$OUT_DIR/logs.tar.gz" -C "$LOGS" .

TABLE="$(cat "$OUT_DIR/summary.txt" 2>/dev/null || echo "no report: the suites step wrote no summary (see logs.tar.gz: suites.log)")"
{
    echo "gpu_check ($MODE, $SHAPE): $([ $FAILED = 0 ] && echo PASS || echo FAIL), ${SECONDS}s total"
    printf '  %s\n' "${STATUS[@]}"
    echo "files: $OUT_DIR/{report.json,report.md,report.png,summary.txt,sm90_report.md,logs.tar.gz}"
    echo
    echo "$TABLE"
} >"$LOGS/summary.txt"
cp "$LOGS/summary.txt" "$OUT_DIR/summary.txt"
rm -rf "$LOGS"
echo
cat "$OUT_DIR/summary.txt"
exit $FAILED
