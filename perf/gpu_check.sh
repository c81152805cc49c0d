#!/usr/bin/env bash
# The whole GPU campaign in one run on a fresh lent GPU machine (no network, runs as root):
#
#   cd <repo root> && bash perf/gpu_check.sh          # results under $OUT (default ./out)
#
# Carry the peers' wheels (bash perf/fetch_peer_wheels.sh puts them in .whl/) and name `.whl`
# in the run's carry list; perf/README.md gives the exact `run` call.
#
# Stages, by value, each under `timeout` against one overall deadline (BUDGET_S, default 510 s:
# the run ends inside 9 minutes, leaving a 15-minute lease time to rerun a part):
#  0. install: the package (pip -e --no-index, else a source copy on PYTHONPATH) and the peers'
#     wheels offline into a scratch site folder;
#  1. correctness, in parallel (none of it is timed): `triton-adam check`, the peers' report
#     (version or import/step error of each), and the CUDA-marked tests on pytest-xdist workers
#     with a per-test timeout (the first H200 run spent its 96 s compiling kernels one by one:
#     8 workers compile 8 at a time, and warm Triton's cache for the benches);
#  2. benches, one at a time (timed): the goal table of issue 21 (Llama-3.2-1B fp32, bf16,
#     fp32 fused clip, int8 moments vs bitsandbytes 8-bit, bf16 SR vs torchao's SR, bf16
#     compact master + bf16 states), many-small and GPT-2 124M (issue 20's host/device split),
#     then the peers that run eagerly on Llama fp32 and bf16;
#  3. the dense kernel's launch sweep (perf/dense_tune.py, when present), one Nsight Compute
#     profile of the default dense launch (when ncu is there), then the peers that
#     torch.compile per shape (heavyball, torchao 8-bit/4-bit/fp8) on Llama fp32 and bf16;
#  4. the quantised kernels' launch sweep (perf/quant_tune.py);
#  5. a summary: each stage's status and time, then every measured provider (printed last).
# A stage stopped by its timeout gets SIGINT and 15 s more; a bench then writes what it measured.
# Knobs: OUT, PYTHON, BUDGET_S, STEPS, WHEELS (.whl), XDIST (8 workers), SKIP_INSTALL=1,
# STAGES (comma list of stage names to run, default all: install,check,peers,tests,bench,peers-
# bench,dense,ncu,quant; for a rerun of a part, e.g. STAGES=install,dense,ncu).
#
# $OUT holds at most 8 files, at most one folder down (what comes back from a lent machine):
# log.txt (every stage's log, in order), summary.txt, bench.json (a JSON list of the bench
# records; `triton-adam report out/bench.json` reads it), check.json, peers.json,
# bench-llama-3.2-1b.png, ncu.txt, dense_tune.tar.gz (the sweep's --out folder). Commit them
# under perf/results/<gpu>-<date>/ (the summary names the folder).
set -u

PY=${PYTHON:-python3}
# -P (Python 3.11+): do not put the repo root first on sys.path. Its triton_adam/ lacks the
# kernels/ subpackage that the install maps in, and would shadow the installed package.
if "${PY[@]}" -P -c "" 2>/dev/null; then PY=("${PY[@]}" -P); else PY=("${PY[@]}"); fi
OUT=${OUT:-./out}
BUDGET_S=${BUDGET_S:-510}
STEPS=${STEPS:-10}
WHEELS=${WHEELS:-.whl}
XDIST=${XDIST:-8}
STAGES=${STAGES:-all}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # per-stage logs, JSON, status, site
mkdir -p "$WORK/status"
LOG="$OUT/log.txt"
: >"$LOG"
START=$(date +%s)
SEQ=0

remaining() { echo $((BUDGET_S - ($(date +%s) - START))); }
wanted() { [ "$STAGES" = all ] || [[ ",$STAGES," == *",$1,"* ]]; }

# append_log NAME FILE: add FILE to $OUT/log.txt under a header, so one file carries every log.
append_log() {
    { echo; echo "===== $1"; cat "$2" 2>/dev/null; } >>"$LOG"
}

# note NAME STATUS [SECONDS]: one summary line, in the order stages started.
note() {
    SEQ=$((SEQ + 1))
    printf '%-24s %-10s %5s\n' "$1" "$2" "${3:-}" >"$WORK/status/$(printf %02d $SEQ)-$1"
}

# run_part NAME LIMIT_S CMD...: run CMD with at most LIMIT_S (and never past the deadline),
# log to $WORK/NAME.log (then into $OUT/log.txt), show the log's tail, record status and time.
# Runs in the background when called with `&`: its summary line is a file, not a variable.
run_part() {
    local name=$1 limit=$2; shift 2
    local left; left=$(remaining)
    SEQ=$((SEQ + 1))
    local status_file; status_file="$WORK/status/$(printf %02d $SEQ)-$name"
    if [ "$left" -lt 10 ]; then
        printf '%-24s %-10s %5s\n' "$name" no-time - >"$status_file"
        echo "=== $name: skipped, out of time budget" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (limit ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|130) status=timeout ;;
        2) status=unavail ;;
        5) status=no-tests ;;
        *) status="rc=$rc" ;;
    esac
    { echo "--- $name ($status, $(( $(date +%s) - t0 ))s) tail:"; tail -n 25 "$WORK/$name.log"; }
    printf '%-24s %-10s %4ss\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >"$status_file"
    append_log "$name ($status, limit ${limit}s): $*" "$WORK/$name.log"
}

echo "=== environment"
"${PY[@]}" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib, platform
print("python", platform.python_version())
for mod in ("torch", "triton", "numpy", "rich", "pytest", "xdist", "pytest_timeout", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:14s} {getattr(m, '__version__', '?')}")
    except Exception as exc:
        print(f"{mod:14s} MISSING ({type(exc).__name__}: {exc})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv 2>/dev/null | tee -a "$LOG"

# ---- 0. install: the package, then the peers' wheels (offline, no dependencies: the image has
# numpy, packaging, opt-einsum and triton; perf/fetch_peer_wheels.sh says why each version)
if [ "${SKIP_INSTALL:-0}" != 1 ] && timeout 90 "${PY[@]}" -m pip install --no-deps --no-build-isolation --no-index -e . >"$WORK/install.log" 2>&1 \
   && (cd / && "${PY[@]}" -c "import triton_adam, triton_adam.kernels, triton_adam.cli") >>"$WORK/install.log" 2>&1; then
    note install "pip -e"
else
    # pyproject maps kernels/ to triton_adam.kernels, so a bare PYTHONPATH=. would miss it:
    # assemble the package layout in a scratch folder instead.
    SRC="$WORK/pysrc"
    rm -rf "$SRC" && mkdir -p "$SRC"
    cp -r triton_adam "$SRC/triton_adam"
    [ -d kernels ] && [ ! -e "$SRC/triton_adam/kernels" ] && cp -r kernels "$SRC/triton_adam/kernels"
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
    note install PYTHONPATH
    echo "pip install failed (see the install section of $LOG); using PYTHONPATH=$SRC"
fi
append_log install "$WORK/install.log"
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # a scratch --target site, not the image's venv: nothing of the image is replaced
    if timeout 60 "${PY[@]}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$WORK/site" "$WHEELS"/*.whl >"$WORK/wheels.log" 2>&1; then
        export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$WORK/site"
        note wheels "$(ls "$WHEELS"/*.whl | wc -l) wheels"
    else
        note wheels failed
    fi
    append_log "peer wheels (offline install into $WORK/site)" "$WORK/wheels.log"
else
    note wheels "none in $WHEELS"
fi
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
if "${PY[@]}" -c "import pytest" >/dev/null 2>&1; then HAVE_PYTEST=1; else HAVE_PYTEST=0; fi

# ---- 1. correctness, in parallel: nothing here is timed, and the tests' workers compile the
# kernels the benches launch (Triton's on-disk cache), 8 at a time instead of one by one
PIDS=()
# bg_part ARGS...: run_part in the background (its summary line numbered as if in order)
bg_part() { run_part "$@" & PIDS+=($!); SEQ=$((SEQ + 1)); }
wanted check && bg_part check 60 "${PY[@]}" -m triton_adam check --json "$OUT/check.json"
wanted peers && bg_part peers 90 "${PY[@]}" perf/peer_report.py --json "$OUT/peers.json"
if wanted tests && [ $HAVE_PYTEST = 1 ]; then
    XDIST_ARGS=()
    if [ "$XDIST" -gt 1 ] && "${PY[@]}" -c "import xdist" >/dev/null 2>&1; then
        XDIST_ARGS=(-n "$XDIST")
    fi
    TIMEOUT_ARGS=()
    "${PY[@]}" -c "import pytest_timeout" >/dev/null 2>&1 && TIMEOUT_ARGS=(--timeout 90)
    # every CUDA-marked test, the distributed ones on NCCL (a world of one process) included
    bg_part tests-cuda 120 "${PY[@]}" -m pytest tests -m cuda \
        -q -rs -p no:cacheprovider --durations 10 "${XDIST_ARGS[@]}" "${TIMEOUT_ARGS[@]}"
fi
[ ${#PIDS[@]} -gt 0 ] && wait "${PIDS[@]}"

# ---- 2. benchmarks, one at a time: one invocation per configuration, so that one slow case
# cannot eat the others' time
# merge_bench_json: every bench record so far, as one JSON list in $OUT/bench.json (rewritten
# after each bench, so a run cut short still leaves what it measured).
merge_bench_json() {
    local files=("$WORK"/bench-*.json)
    [ -e "${files[0]}" ] || return 0
    "${PY[@]}" - "$OUT/bench.json" "${files[@]}" <<'PYEOF'
import json, sys
records = []
for path in sys.argv[2:]:
    try:
        with open(path) as f:
            records.append(json.load(f))
    except (OSError, ValueError) as exc:  # a bench killed mid-write: say so, keep the rest
        print(f"bench.json: skipped {path}: {exc}", file=sys.stderr)
with open(sys.argv[1], "w") as f:
    json.dump(records, f, indent=1)
PYEOF
}
bench() {  # bench NAME LIMIT ARGS...
    local name=$1 limit=$2; shift 2
    run_part "bench-$name" "$limit" "${PY[@]}" -m triton_adam bench --steps "$STEPS" \
        --json "$WORK/bench-$name.json" "$@"
    merge_bench_json
}
L=(--preset llama-3.2-1b)
YARD=triton-adam,fused
if wanted bench; then
    # issue 21's table, each row with its yardstick in the same process
    bench llama-1b 40 "${L[@]}" --dtype fp32,bf16 --providers $YARD \
        --plot "$OUT/bench-llama-3.2-1b.png"
    # torch's clip_grad_norm_ + step against the fused clip: 40 vs 32 B/elem
    bench llama-1b-clip 30 "${L[@]}" --dtype fp32 --clip 1.0 --providers $YARD
    # int8 moments against torch fused fp32 and bitsandbytes 8-bit (issue 10: >= 1.5x fused,
    # faster than the 8-bit peers; torchao's 8-bit, compiled per shape, is in the peers' bench)
    bench llama-1b-int8 35 "${L[@]}" --dtype fp32 --state-dtype int8 --providers $YARD,bnb-8bit
    # stochastic rounding against our pure bf16 (the llama-1b bench) and torchao's SR
    bench llama-1b-sr 45 "${L[@]}" --dtype bf16 --stochastic-rounding \
        --providers $YARD,torchao-bf16-sr
    bench llama-1b-compact 25 "${L[@]}" --dtype bf16 --master-weights compact \
        --state-dtype bf16 --providers $YARD
    # host-bound presets: the device time with the host ahead beside step()'s host time
    bench many-small 30 --preset many-small --providers $YARD,foreach
    bench gpt2-124m 25 --preset gpt2-124m --providers $YARD,foreach
fi
# every peer on the Llama fp32 and bf16 cases: first those that run eagerly, then (after the
# dense sweep) those that torch.compile per param shape on first use, the slowest to start
PEERS_EAGER=optimi,optimi-kahan,flashoptim,bnb-8bit
PEERS_COMPILED=heavyball,torchao-8bit,torchao-4bit,torchao-fp8
wanted peers-bench && bench llama-1b-peers 50 "${L[@]}" --dtype fp32,bf16 \
    --providers $YARD,$PEERS_EAGER

# ---- 3. the dense kernel's launch sweep and its profile
if wanted dense && [ -f perf/dense_tune.py ]; then
    run_part dense-tune 90 "${PY[@]}" perf/dense_tune.py --out "$WORK/dense_tune"
    # one file back (a lent machine returns at most 8): the sweep's whole folder
    [ -d "$WORK/dense_tune" ] && tar -czf "$OUT/dense_tune.tar.gz" -C "$WORK" dense_tune
elif wanted dense; then
    note dense-tune "no script"
fi
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null \
      | head -n 1)
if wanted ncu && [ -n "$NCU" ]; then
    # one steady-state step of the default dense launch, counters read with the card's clocks
    # as they are (--clock-control none: leave the card's settings alone). GPT-2 124M fp32, not
    # Llama: ncu replays each kernel once per counter pass and restores the memory it may write
    # before each (the kernels reach their tensors through pointer tables, so that is all of
    # it): 3.5 GB a pass instead of 20; the same kernel and launch, over 30,000 programs.
    run_part ncu 60 "$NCU" --profile-from-start off --clock-control none --target-processes all \
        --launch-count 4 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats --section WarpStateStats \
        --section SchedulerStats "${PY[@]}" perf/profile_step.py --preset gpt2-124m --dtype fp32
    cp "$WORK/ncu.log" "$OUT/ncu.txt" 2>/dev/null
elif wanted ncu; then
    note ncu "no ncu"
fi

wanted peers-bench && bench llama-1b-peers-compiled 90 "${L[@]}" --dtype fp32,bf16 \
    --providers $YARD,$PEERS_COMPILED

# ---- 4. the quantised kernels' launch sweep (int8 at each candidate on fp32 and bf16 params,
# int4 and fp8 at the default) against torch fused; the table goes to log.txt
if wanted quant; then
    run_part quant-tune 120 "${PY[@]}" perf/quant_tune.py --steps "$STEPS" --dtype fp32,bf16 \
        --candidates 8x2048/80,8x2048/64,4x1024/80 --formats int8,int4,fp8
fi

# ---- 5. summary, printed last
GPU=$("${PY[@]}" -c "import torch; name = torch.cuda.get_device_name(0).lower()
print(name.replace('nvidia ', 'nvidia-').replace(' ', '-'))" 2>/dev/null || echo gpu)
{
    echo
    echo "=== summary (log.txt and JSON in $OUT, total $(( $(date +%s) - START ))s;"
    echo "    commit them under perf/results/$GPU-$(date -u +%F)/)"
    cat "$WORK"/status/* 2>/dev/null
    grep -h -A 20 "^peers on" "$WORK/peers.log" 2>/dev/null
    if [ -s "$OUT/bench.json" ]; then
        "${PY[@]}" -m triton_adam report "$OUT/bench.json" 2>&1
    fi
} | tee "$OUT/summary.txt"
rm -rf "$WORK"
