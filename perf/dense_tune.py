"""Measure the dense step kernel's launch configurations on a GPU, in one run.

    python perf/dense_tune.py --out DIR [--quick] [--preset llama-3.2-1b] [--dtype fp32,bf16]
                              [--steps 10] [--candidates 8x4096/2048,4x2048/1024,...]
    python perf/dense_tune.py --dry-run        # list the candidates (no GPU needed)

A candidate is WARPSxBLOCK/TILE: warps per program, elements per program (its block of the
block map) and elements per tile, the part of the block a program loads, updates and stores
at a time (BLOCK / TILE tiles one after the other; a thread holds TILE / (32 * WARPS) elements
of a tile, the loads it has in flight). Each is set in triton_adam._tables before the optimizer
is built, so its kernels compile with it (unaligned tiles stay as they are, at most BLOCK); the
bench's own runner times the step with CUDA events (median) and counts its bytes. Per dtype,
torch's fused AdamW is timed once as the yardstick, and the run's device copy gives the time
the same bytes take to copy (bytes read + written at the copy bandwidth measured in that
run). A persistent grid is not among the candidates: the block map already hands each program
its (tensor, block) row, and a loop over rows would need a new kernel.

--out DIR writes DIR/dense_tune.json (every record) and DIR/dense_tune.md (the table, also
printed). --quick: the first 4 candidates, 5 timed steps. Without CUDA it says so and exits
with status 2 (--dry-run works anywhere). perf/kernel_stats.py gives the static model;
perf/quant_tune.py is the same sweep for quantised moments.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

import torch

from triton_adam import _tables
from triton_adam.bench import providers as provs
from triton_adam.bench import runner


def current():
    """The dense launch the optimizer uses now: (warps, block, tile)."""
    return (_tables.NUM_WARPS, _tables.BLOCK_SIZE, _tables.ALIGNED_TILE_SIZE)


# the default first; then one tile a program, four, fewer elements a thread (4 warps: more
# programs an SM; 4 a thread), bigger programs, and 16 elements a thread
DEFAULT_CANDIDATES = [current(), (8, 2048, 2048), (8, 8192, 2048), (4, 4096, 1024),
                      (4, 2048, 1024), (8, 4096, 1024), (16, 4096, 4096), (8, 4096, 4096)]
QUICK_CANDIDATES = 4
MAX_PER_THREAD = 16  # elements a thread holds in a tile: more spilled (see _tables)


def label(candidate) -> str:
    warps, block, tile = candidate
    return f"{warps}x{block}/{tile}"


def check(candidate) -> tuple:
    """The candidate as ints, or ValueError saying why the kernel cannot take it."""
    warps, block, tile = map(int, candidate)
    powers = all(n > 0 and n & (n - 1) == 0 for n in (warps, block, tile))
    if not powers or tile > block or tile < 32 * warps or \
            tile // (32 * warps) > MAX_PER_THREAD:
        raise ValueError(f"{label((warps, block, tile))}: warps, block and tile must be powers "
                         f"of 2 with 32 * warps <= tile <= block and at most {MAX_PER_THREAD} "
                         "elements a thread")
    return warps, block, tile


def parse_candidates(text: str | None, quick: bool = False) -> list:
    """WARPSxBLOCK/TILE, comma-separated (None: the default list, its head with ``quick``)."""
    if not text:
        chosen = list(dict.fromkeys(DEFAULT_CANDIDATES))
        return chosen[:QUICK_CANDIDATES] if quick else chosen
    out = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)/(\d+)\s*", item.lower())
        if not match:
            raise ValueError(f"candidate {item!r} is not WARPSxBLOCK/TILE")
        out.append(check(match.groups()))
    return out


@contextlib.contextmanager
def launch(candidate):
    """The optimizers built inside use ``candidate`` for their dense step kernels."""
    warps, block, tile = check(candidate)
    saved = (_tables.NUM_WARPS, _tables.BLOCK_SIZE, _tables.ALIGNED_TILE_SIZE,
             _tables.UNALIGNED_TILE_SIZE, _tables.UNALIGNED_MASTER_TILE_SIZE)
    try:
        _tables.NUM_WARPS, _tables.BLOCK_SIZE, _tables.ALIGNED_TILE_SIZE = warps, block, tile
        _tables.UNALIGNED_TILE_SIZE = min(saved[3], block)
        _tables.UNALIGNED_MASTER_TILE_SIZE = min(saved[4], block)
        yield
    finally:
        (_tables.NUM_WARPS, _tables.BLOCK_SIZE, _tables.ALIGNED_TILE_SIZE,
         _tables.UNALIGNED_TILE_SIZE, _tables.UNALIGNED_MASTER_TILE_SIZE) = saved


def _bench(preset, dtype, provider, steps, warmup):
    cfg = runner.BenchConfig(device="cuda", presets=[preset], dtypes=[dtype],
                             providers=[provider], repeats=steps, warmup=warmup,
                             optim=provs.OptimConfig())
    record = runner.run_bench(cfg)
    return record["results"][0], (record.get("copy_bandwidth") or {}).get("gbps")


HEADER = ("| dtype | launch (warps x block / tile) | tiles a program | step ms | GB/s | "
          "% of copy | vs torch fused |\n|---|---|---:|---:|---:|---:|---:|")


def _line(dtype, name, tiles, row, copy_ms, fused_ms) -> str:
    if row.get("status") != "ok":
        return f"| {dtype} | {name} | {tiles} | {row.get('status')}: {row.get('reason')} | | | |"
    ms, gbps = row["median_ms"], row.get("gbps") or 0
    share = f"{100 * copy_ms / ms:.0f}" if copy_ms else "-"
    ratio = f"{fused_ms / ms:.2f}x" if fused_ms else "-"
    return f"| {dtype} | {name} | {tiles} | {ms:.3f} | {gbps:.0f} | {share} | {ratio} |"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write dense_tune.json and dense_tune.md here")
    parser.add_argument("--quick", action="store_true",
                        help=f"the first {QUICK_CANDIDATES} candidates, 5 timed steps")
    parser.add_argument("--dry-run", action="store_true", help="list the candidates and exit")
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="fp32,bf16")
    parser.add_argument("--steps", type=int, help="timed steps (default 10, 5 with --quick)")
    parser.add_argument("--candidates", help="WARPSxBLOCK/TILE, comma-separated")
    args = parser.parse_args(argv)
    try:
        candidates = parse_candidates(args.candidates, args.quick)
    except ValueError as exc:
        parser.error(str(exc))
    if args.dry_run:
        for candidate in candidates:
            warps, block, tile = candidate
            print(f"{label(candidate)}: {block // tile} tile(s) a program, "
                  f"{tile // (32 * warps)} elements a thread"
                  f"{' (the current default)' if candidate == current() else ''}")
        return 0
    if not torch.cuda.is_available():
        print("dense_tune times the step kernel on a CUDA device, and this machine has none "
              "(torch.cuda.is_available() is False); --dry-run lists the candidates",
              file=sys.stderr)
        return 2
    steps = args.steps or (5 if args.quick else 10)
    warmup = 1 if args.quick else 2
    records, lines = [], [HEADER]
    print(HEADER, flush=True)

    def emit(line):
        lines.append(line)
        print(line, flush=True)

    for dtype in args.dtype.split(","):
        fused, copy_gbps = _bench(args.preset, dtype, "fused", steps, warmup)
        nbytes = fused.get("bytes_per_step")
        copy_ms = 1e3 * nbytes / (copy_gbps * 1e9) if nbytes and copy_gbps else None
        fused_ms = fused.get("median_ms")
        records.append(dict(fused, candidate=None, copy_gbps=copy_gbps, copy_ms=copy_ms))
        emit(f"| {dtype} | device copy of the same bytes | - | "
             f"{copy_ms or float('nan'):.3f} | {copy_gbps or 0:.0f} | 100 | - |")
        emit(_line(dtype, "torch fused AdamW", "-", fused, copy_ms, fused_ms))
        for candidate in candidates:
            with launch(candidate):
                row, _ = _bench(args.preset, dtype, "triton-adam", steps, warmup)
            records.append(dict(row, candidate=label(candidate), copy_ms=copy_ms,
                                fused_ms=fused_ms))
            tiles = candidate[1] // candidate[2]
            emit(_line(dtype, label(candidate), tiles, row, copy_ms, fused_ms))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dense_tune.json").write_text(json.dumps(records, indent=1))
        (out / "dense_tune.md").write_text(
            f"# Dense launch sweep, {args.preset} ({torch.cuda.get_device_name()})\n\n"
            + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
