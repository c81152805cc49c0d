"""Timing of optimizer steps and of the device's copy bandwidth.

GPU: CUDA events around each step, with a synchronize before reading them (the
``triton.testing.do_bench`` approach, minus its L2 flush: the step's working set is far larger
than L2 for the real presets). Host time is the wall time of the ``step()`` call itself without
synchronising, i.e. what the Python side costs before the GPU work is queued.
CPU: ``time.perf_counter`` around each step; the call is synchronous, so host time = step time.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch


@dataclass
class StepTiming:
    """Per-step figures of one provider on one preset (milliseconds, bytes)."""

    median_ms: float
    min_ms: float
    max_ms: float
    host_median_ms: float
    repeats: int
    peak_extra_bytes: Optional[int]  # None where it cannot be measured (CPU)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[], None],
    device: torch.device,
    warmup: int,
    repeats: int,
    before_each: Optional[Callable[[], None]] = None,
) -> StepTiming:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times timed; return medians.

    ``before_each`` runs outside the timed region before every step (e.g. to refresh grads).
    Peak extra memory is ``max_memory_allocated`` during the timed steps minus what was
    allocated before them, so state created by the first (warm-up) step is not counted.
    """
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        step()
    _sync(device)

    device_ms: List[float] = []
    host_ms: List[float] = []
    peak: Optional[int] = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        for _ in range(repeats):
            if before_each is not None:
                before_each()
            start.record()
            t0 = time.perf_counter()
            step()
            host_ms.append((time.perf_counter() - t0) * 1e3)
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        for _ in range(repeats):
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            step()
            device_ms.append((time.perf_counter() - t0) * 1e3)
        host_ms = list(device_ms)
    return StepTiming(
        median_ms=statistics.median(device_ms),
        min_ms=min(device_ms),
        max_ms=max(device_ms),
        host_median_ms=statistics.median(host_ms),
        repeats=repeats,
        peak_extra_bytes=peak,
    )


@dataclass
class CopyBandwidth:
    """Measured copy bandwidth: bytes read + written per second."""

    nbytes: int  # size of the copied tensor; the copy moves 2x this
    median_ms: float
    gbps: float  # (read + write) / time, in 1e9 B/s


def measure_copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> CopyBandwidth:
    """Time ``dst.copy_(src)`` for a large tensor on ``device``; count read + write bytes."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_steps(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    moved = 2 * n * 4
    del src, dst
    return CopyBandwidth(nbytes=n * 4, median_ms=t.median_ms, gbps=moved / (t.median_ms * 1e-3) / 1e9)


def default_copy_bytes(device: torch.device) -> int:
    """Copy size: well past the last-level cache, bounded by free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(2 * 2**30, free // 4))
    # 256 MiB even with --quick: anything near the L3 size (32 MiB here) flatters the copy.
    return 256 * 2**20
