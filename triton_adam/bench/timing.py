"""Timing of optimizer steps and of the device's copy bandwidth.

GPU, three figures per step, each the median over the timed repeats:
- step time: CUDA events recorded just before and after ``step()`` (the ``triton.testing.do_bench``
  approach, minus its L2 flush: the real presets' working set is far larger than L2). The GPU is
  idle when the start event is recorded, so a host-bound step's launch gaps count: this is the
  time a training loop that waits for its step sees.
- device time: the same events with the host ahead of the GPU. A GPU-side sleep
  (``torch.cuda._sleep``) queued before the start event holds the GPU until every launch of the
  step is queued behind it, so the events measure the kernels alone and not the Python between
  them. ``host_ahead`` says in what fraction of the repeats the host did finish queuing before
  the sleep ran out (a step that synchronises inside, e.g. reading a norm on the host, cannot
  be); the sleep grows when it ran out too soon.
- host time: the wall time of the ``step()`` call without synchronising, i.e. what the Python
  side costs before the GPU work is queued.
CPU: ``time.perf_counter`` around each step; the call is synchronous, so all three are equal.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

# The sleep covers this many times the longest host time seen in the step-time repeats (plus
# SLEEP_MARGIN_MS), doubling after a repeat where it ran out first, up to MAX_SLEEP_MS.
SLEEP_HOST_FACTOR = 2.0
SLEEP_MARGIN_MS = 0.5
MAX_SLEEP_MS = 500.0
CALIBRATION_CYCLES = 2_000_000


@dataclass
class StepTiming:
    """Per-step figures of one provider on one preset (milliseconds, bytes)."""

    median_ms: float
    min_ms: float
    max_ms: float
    host_median_ms: float
    repeats: int
    peak_extra_bytes: Optional[int]  # None where it cannot be measured (CPU)
    device_median_ms: float  # with the host ahead of the GPU (= median_ms on a CPU)
    device_min_ms: float
    host_ahead: Optional[float]  # fraction of device-time repeats with the host ahead; None: CPU


class CudaClock:
    """What ``time_steps`` needs from CUDA: timing events, a GPU-side sleep, a synchronize and
    the host's clock. The tests inject a fake with the same methods to check the logic on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def event(self):
        """A timing event with ``record()``, ``query()`` and ``elapsed_time(end)`` (ms)."""
        return torch.cuda.Event(enable_timing=True)

    def sleep(self, cycles: int) -> None:
        """Queue a kernel that spins for ``cycles`` GPU clock cycles."""
        torch.cuda._sleep(int(cycles))

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def now_ms(self) -> float:
        return time.perf_counter() * 1e3


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cycles_per_ms(clock) -> float:
    """GPU clock cycles per millisecond of ``clock.sleep``, measured with events."""
    clock.synchronize()
    start, end = clock.event(), clock.event()
    start.record()
    clock.sleep(CALIBRATION_CYCLES)
    end.record()
    clock.synchronize()
    return CALIBRATION_CYCLES / max(start.elapsed_time(end), 1e-6)


def _event_repeats(clock, step, before_each, repeats, sleep_ms: Optional[float] = None):
    """Time ``repeats`` steps with events: (elapsed ms, host ms, host ahead) per repeat.

    With ``sleep_ms``, a GPU-side sleep before the start event keeps the GPU behind the host;
    a repeat where the start event has already passed when ``step()`` returns had the host
    behind, and the sleep doubles for the next one."""
    cycles_per_ms = _cycles_per_ms(clock) if sleep_ms is not None else 0.0
    elapsed, host, ahead = [], [], []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        start, end = clock.event(), clock.event()
        if sleep_ms is not None:
            clock.sleep(sleep_ms * cycles_per_ms)
        start.record()
        t0 = clock.now_ms()
        step()
        host.append(clock.now_ms() - t0)
        if sleep_ms is not None:
            ahead.append(not start.query())  # still asleep: every launch was queued first
            if not ahead[-1]:
                sleep_ms = min(2 * sleep_ms, MAX_SLEEP_MS)
        end.record()
        clock.synchronize()
        elapsed.append(start.elapsed_time(end))
    return elapsed, host, ahead


def time_steps(
    step: Callable[[], None],
    device: torch.device,
    warmup: int,
    repeats: int,
    before_each: Optional[Callable[[], None]] = None,
    clock=None,
) -> StepTiming:
    """Run ``step`` ``warmup`` times untimed, then ``repeats`` times timed; return medians.

    ``before_each`` runs outside the timed region before every step (e.g. to refresh grads).
    On CUDA (or with a ``clock``, see ``CudaClock``) the timed repeats run twice: for the step
    time, then with the host ahead for the device time (module docstring).
    Peak extra memory is ``max_memory_allocated`` during the timed steps minus what was
    allocated before them, so state created by the first (warm-up) step is not counted.
    """
    for _ in range(warmup):
        if before_each is not None:
            before_each()
        step()
    _sync(device)
    if clock is None and device.type == "cuda":
        clock = CudaClock(device)

    peak: Optional[int] = None
    if clock is None:
        step_ms: List[float] = []
        for _ in range(repeats):
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            step()
            step_ms.append((time.perf_counter() - t0) * 1e3)
        host_ms, device_ms, ahead = list(step_ms), list(step_ms), None
    else:
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        step_ms, host_ms, _ = _event_repeats(clock, step, before_each, repeats)
        sleep_ms = SLEEP_HOST_FACTOR * max(host_ms) + SLEEP_MARGIN_MS
        device_ms, _, flags = _event_repeats(clock, step, before_each, repeats, sleep_ms)
        ahead = sum(flags) / len(flags)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
    return StepTiming(
        median_ms=statistics.median(step_ms),
        min_ms=min(step_ms),
        max_ms=max(step_ms),
        host_median_ms=statistics.median(host_ms),
        repeats=repeats,
        peak_extra_bytes=peak,
        device_median_ms=statistics.median(device_ms),
        device_min_ms=min(device_ms),
        host_ahead=ahead,
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
