"""One triton-adam step between cudaProfilerStart and Stop, for Nsight Compute to read.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \
        python perf/profile_step.py [--preset llama-3.2-1b] [--dtype fp32] [--warmup 2]

The warm-up steps (first-use compiles, state allocation) run outside the profiled range, so ncu
sees only the launches of one steady-state step with the default launch configuration:
perf/gpu_check.sh wraps it in ncu (DRAM throughput, achieved occupancy, warp stall reasons).
Without CUDA it runs the same steps on the CPU and profiles nothing (the interpreter smoke test).
"""
from __future__ import annotations

import argparse
import sys

import torch

import triton_adam
from triton_adam.bench import presets
from triton_adam.bench.runner import DTYPES


def make_params(preset: str, dtype: torch.dtype, device: torch.device) -> list:
    """The preset's params with random (never zero) grads."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for _, shape in presets.get_preset(preset).params():
        p = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        p.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        params.append(p)
    return params


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    params = make_params(args.preset, DTYPES[args.dtype], device)
    opt = triton_adam.AdamW(params, lr=1e-3, weight_decay=1e-2)
    for _ in range(max(args.warmup, 1)):
        opt.step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    opt.step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"profiled one step: {args.preset} {args.dtype}, {len(params)} tensors, "
          f"{sum(p.numel() for p in params):,} params on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
