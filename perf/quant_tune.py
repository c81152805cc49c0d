"""Measure the quantised step kernel's launch configurations on a GPU, in one run.

    python perf/quant_tune.py [--preset llama-3.2-1b] [--dtype fp32,bf16] [--steps 10]
                              [--candidates 8x2048/80,8x2048/64,...] [--formats int8,int4,fp8]
                              [--json tune.json]

Each candidate (warps per program x elements per aligned tile, which a program updates, and
optionally /the register ceiling of ptxas, else the current one) is set in triton_adam._tables
before the optimizer is built, so its kernels compile with it; the bench's own runner times
the step (CUDA events, median) and counts the bytes. Every candidate runs int8 states on each
param dtype; the other formats run at the first candidate (the current default unless
--candidates says otherwise). torch's fused AdamW (moments in the params' dtype) is timed
once per dtype as the yardstick. Prints a table (ms, GB/s, % of the copy bandwidth, ratio to
fused) and writes the records with --json. perf/kernel_stats.py gives the same candidates'
static model. On a CPU (the interpreter) it runs too, slowly: for a smoke test use a small
preset.
"""
from __future__ import annotations

import argparse
import json
import sys

from triton_adam import _tables
from triton_adam.bench import providers as provs
from triton_adam.bench import runner

def _current():
    return (_tables.QUANT_NUM_WARPS, _tables.ALIGNED_QUANT_TILE_SIZE,
            _tables.ALIGNED_QUANT_MAX_REGISTERS)


DEFAULT_CANDIDATES = [_current(), (8, 2048, 64), (8, 1024, 80), (4, 1024, 80)]


def _candidates(text: str | None):
    if not text:
        return list(dict.fromkeys(DEFAULT_CANDIDATES))
    out = []
    for item in text.split(","):
        launch, _, ceiling = item.lower().partition("/")
        warps, tile = launch.split("x")
        out.append((int(warps), int(tile),
                    int(ceiling) if ceiling else _tables.ALIGNED_QUANT_MAX_REGISTERS))
    return out


def _label(warps: int, tile: int, ceiling: int) -> str:
    return f"{warps}x{tile}/{ceiling}"


def _set_launch(warps: int, tile: int, ceiling: int) -> None:
    _tables.QUANT_NUM_WARPS = warps
    _tables.ALIGNED_QUANT_TILE_SIZE = tile
    _tables.ALIGNED_QUANT_MAX_REGISTERS = ceiling


def _bench(preset, dtype, provider, state_dtype, steps, device):
    cfg = runner.BenchConfig(device=device, presets=[preset], dtypes=[dtype],
                             providers=[provider], repeats=steps, warmup=2,
                             optim=provs.OptimConfig(state_dtype=state_dtype))
    record = runner.run_bench(cfg)
    row = record["results"][0]
    copy = (record.get("copy_bandwidth") or {}).get("gbps")
    return row, copy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--candidates", help="WARPSxTILE[/REGISTERS], comma-separated")
    parser.add_argument("--formats", default="int8,int4,fp8")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    default = _current()
    candidates = _candidates(args.candidates)
    formats = args.formats.split(",")
    records = []
    print("| dtype | state | warps x tile / registers | step ms | GB/s | % copy | vs fused |")
    print("|---|---|---|---:|---:|---:|---:|")
    for dtype in args.dtype.split(","):
        fused, copy = _bench(args.preset, dtype, "fused", None, args.steps, args.device)
        records.append(dict(fused, candidate=None))
        fused_ms = fused.get("median_ms")
        print(f"| {dtype} | torch fused (moments in {dtype}) | - | "
              f"{fused_ms or float('nan'):.3f} | {fused.get('gbps') or 0:.0f} | "
              f"{100 * (fused.get('gbps') or 0) / copy if copy else 0:.0f} | 1.00x |", flush=True)
        for index, candidate in enumerate(candidates):
            label = _label(*candidate)
            for state_dtype in formats if index == 0 else formats[:1]:
                _set_launch(*candidate)
                try:
                    row, copy = _bench(args.preset, dtype, "triton-adam", state_dtype,
                                       args.steps, args.device)
                finally:
                    _set_launch(*default)
                records.append(dict(row, candidate=label, state_dtype=state_dtype))
                if row.get("status") != "ok":
                    print(f"| {dtype} | {state_dtype} | {label} | {row.get('status')}: "
                          f"{row.get('reason')} | | | |", flush=True)
                    continue
                ms, gbps = row["median_ms"], row.get("gbps") or 0
                ratio = f"{fused_ms / ms:.2f}x" if fused_ms else "-"
                print(f"| {dtype} | {state_dtype} | {label} | {ms:.3f} | {gbps:.0f} | "
                      f"{100 * gbps / copy if copy else 0:.0f} | {ratio} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
