#!/usr/bin/env bash
# One-shot GPU check for triton-adam, for a fresh lent GPU machine (no network, runs as root).
#
#   cd <repo root> && bash perf/gpu_check.sh          # results under $OUT (default ./out)
#
# 1. install the package without dependencies (falls back to a source copy on PYTHONPATH),
# 2. the CUDA tests (skips are fine) and `triton-adam check` (parity vs torch per dtype),
# 3. `triton-adam bench` on the main presets, one JSON per preset under $OUT,
# 4. `triton-adam kernels --target sm_90`, then the non-CUDA tests with the GPU visible,
# 5. a summary: each part's status and time, then every measured provider.
# Every part runs under `timeout` against one overall deadline (BUDGET_S, default 270 s), so the
# whole script ends within 5 minutes; a bench stopped by its timeout gets SIGINT and still
# writes what it measured. Knobs: OUT, PYTHON, BUDGET_S, STEPS, SKIP_INSTALL=1 (source copy).
set -u

PY=${PYTHON:-python3}
# -P (Python 3.11+): do not put the repo root first on sys.path. Its triton_adam/ lacks the
# kernels/ subpackage that the install maps in, and would shadow the installed package.
if "${PY[@]}" -P -c "" 2>/dev/null; then PY=("${PY[@]}" -P); else PY=("${PY[@]}"); fi
OUT=${OUT:-./out}
BUDGET_S=${BUDGET_S:-270}
STEPS=${STEPS:-10}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(pwd)
START=$(date +%s)
SUMMARY=()

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }

# run_part NAME LIMIT_S CMD...: run CMD with at most LIMIT_S (and never past the deadline),
# log to $OUT/NAME.log, show the log's tail, and remember status and duration.
run_part() {
    local name=$1 limit=$2; shift 2
    local left; left=$(remaining)
    if [ "$left" -lt 10 ]; then
        SUMMARY+=("$(printf '%-22s %-10s %5s' "$name" "no-time" "-")")
        echo "=== $name: skipped, out of time budget"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|130) status=timeout ;;
        2) status=unavail ;;
        5) status=no-tests ;;
        *) status="rc=$rc" ;;
    esac
    tail -n 40 "$OUT/$name.log"
    SUMMARY+=("$(printf '%-22s %-10s %4ss' "$name" "$status" "$(( $(date +%s) - t0 ))")")
}

echo "=== environment"
"${PY[@]}" - <<'PYEOF' 2>&1 | tee "$OUT/environment.log"
import importlib, platform
print("python", platform.python_version())
for mod in ("torch", "triton", "numpy", "rich", "pytest", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:10s} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod:10s} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv 2>/dev/null | tee -a "$OUT/environment.log"

# ---- 1. install
install_ok=0
if [ "${SKIP_INSTALL:-0}" != 1 ] && timeout 90 "${PY[@]}" -m pip install --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
   && (cd / && "${PY[@]}" -c "import triton_adam, triton_adam.kernels, triton_adam.cli") >>"$OUT/install.log" 2>&1; then
    install_ok=1
    SUMMARY+=("$(printf '%-22s %-10s' install "pip -e")")
else
    # pyproject maps kernels/ to triton_adam.kernels, so a bare PYTHONPATH=. would miss it:
    # assemble the package layout in a scratch folder instead.
    SRC="$OUT/pysrc"
    rm -rf "$SRC" && mkdir -p "$SRC"
    cp -r triton_adam "$SRC/triton_adam"
    [ -d kernels ] && [ ! -e "$SRC/triton_adam/kernels" ] && cp -r kernels "$SRC/triton_adam/kernels"
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
    SUMMARY+=("$(printf '%-22s %-10s' install "PYTHONPATH")")
    echo "pip install failed (see $OUT/install.log); using PYTHONPATH=$SRC"
fi
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter

# ---- 2. CUDA tests and parity check: the correctness evidence comes first
if "${PY[@]}" -c "import pytest" >/dev/null 2>&1; then HAVE_PYTEST=1; else HAVE_PYTEST=0; fi
if [ $HAVE_PYTEST = 1 ]; then
    run_part tests-cuda 90 "${PY[@]}" -m pytest tests -m cuda -q -rs -p no:cacheprovider
else
    SUMMARY+=("$(printf '%-22s %-10s' tests "no pytest")")
fi
run_part check 40 "${PY[@]}" -m triton_adam check --json "$OUT/check.json"

# ---- 3. benchmarks: one invocation per preset, so one slow case cannot eat the others' time
bench() {  # bench NAME LIMIT ARGS...
    local name=$1 limit=$2; shift 2
    run_part "bench-$name" "$limit" "${PY[@]}" -m triton_adam bench --steps "$STEPS" \
        --json "$OUT/bench-$name.json" "$@"
}
bench llama-3.2-1b 60 --preset llama-3.2-1b --dtype fp32,bf16 --plot "$OUT/bench-llama-3.2-1b.png"
bench gpt2-124m 25 --preset gpt2-124m
bench many-small 30 --preset many-small
bench vit-b16 20 --preset vit-b16
bench one-huge 45 --preset one-huge --providers triton-adam,fused,foreach

# ---- 4. AOT kernel report and the CPU-side tests with the GPU visible (CI covers them too)
run_part kernels 30 "${PY[@]}" -m triton_adam kernels --target sm_90 --json "$OUT/kernels-sm_90.json"
[ $HAVE_PYTEST = 1 ] && run_part tests-rest 60 "${PY[@]}" -m pytest tests -m "not cuda" -x -q -p no:cacheprovider

# ---- 5. summary
echo
echo "=== summary (logs and JSON in $OUT, total $(( $(date +%s) - START ))s)"
printf '%s\n' "${SUMMARY[@]}"
shopt -s nullglob
jsons=("$OUT"/bench-*.json)
if [ ${#jsons[@]} -gt 0 ]; then
    "${PY[@]}" -m triton_adam report "${jsons[@]}" 2>&1 | tee "$OUT/summary.txt"
fi
