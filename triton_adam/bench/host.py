"""Host time of ``step()``: what the Python in front of the kernels costs, per tensor, per step.

A fused step exists so that the number of tensors stops mattering; its host path is what still
grows with it. This times ``step()`` with the Triton launches stubbed (the same stub as
``bench --fsdp2``: exactly what the host pays before the GPU does any work: checks, grad
addresses, uploads), on any machine, in a spawned process (the stub and ``TRITON_INTERPRET=1``,
which routes CPU tensors to the Triton path, must not leak into the caller), for the modes a
training loop runs:

* ``same grads``: the grads are the same tensors at every step (``zero_grad(set_to_none=False)``);
* ``fresh grads``: new grad tensors at every step (``set_to_none=True``, torch's default), made
  before the timed call (``p.grad = g.clone()``: each grad's Python object already exists);
* ``backward grads``: new grads made by a real backward pass before the timed call, as in
  training: no Python object exists for them yet, and the step's first ``p.grad`` read makes
  one per grad, a cost torch's own step pays as well;
* ``fused clip``, ``skip_nonfinite``: fresh grads with ``max_grad_norm=1.0`` or
  ``skip_nonfinite=True``;
* ``lean``: bfloat16 params, ``master_weights="compact"``, ``state_dtype="int8"`` (every tensor
  quantised), fresh grads;

beside torch's fused AdamW's *whole* CPU step (kernel work included, one thread) over the same
number of float32 tensors, for scale, timed with same, fresh and backward grads. Each row gives
two ratios: to torch fused with the same grads (the yardstick issue 20 set) and to torch fused
given the same kind of grads as the row (like for like: new grads cost every optimizer a
Python object per grad read). Each mode reports the first step (plan build) too.

Times are thread CPU time (``time.thread_time``): on a shared machine the wall clock counts the
time slices other processes took, CPU time does not; the wall medians are recorded beside them.
The collector is off while the steps are timed (after one collection), so that a collection the
harness's own allocations trigger (new grads) does not land in a step, for every provider alike.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

MODES = ("same grads", "fresh grads", "backward grads", "fused clip", "skip_nonfinite", "lean")
# torch fused's rows: one per way of making the grads
TORCH_MODES = ("same grads", "fresh grads", "backward grads")


def grads_kind(mode: str) -> str:
    """How ``mode``'s grads are made: "same grads", "backward grads" or "fresh grads"."""
    return mode if mode in TORCH_MODES else "fresh grads"


@dataclass
class HostBenchConfig:
    """``tensors`` tensors of ``numel`` elements each (the many-small preset's count)."""
    tensors: int = 4096
    numel: int = 16
    warmup: int = 3
    repeats: int = 30
    modes: tuple = MODES
    # processes per row, in rounds over all rows (a drift of the machine's speed falls on
    # every row alike); a row's figure is the median of its processes' medians: on the 2-core
    # VM one process's median of 30 steps varied by up to 25% between processes
    rounds: int = 3


def _options(mode: str) -> dict:
    import torch

    if mode == "fused clip":
        return {"max_grad_norm": 1.0}
    if mode == "skip_nonfinite":
        return {"skip_nonfinite": True}
    if mode == "lean":
        return {"master_weights": "compact", "state_dtype": "int8", "min_quantized_numel": 1,
                "dtype": torch.bfloat16}
    return {}


def _grad_giver(params, kind: str):
    """A function that gives ``params`` this step's grads the ``kind`` way (see the module)."""
    import torch

    pool = [torch.randn_like(p) for p in params]
    if kind == "backward grads":
        def give_grads():
            for p in params:
                p.grad = None
            with torch.enable_grad():
                torch.stack([(p * w).sum() for p, w in zip(params, pool)]).sum().backward()
        return give_grads
    fresh = kind == "fresh grads"

    def give_grads():
        for p, g in zip(params, pool):
            p.grad = g.clone() if fresh else g
    return give_grads


def _timed_steps(opt, params, config: HostBenchConfig, kind: str):
    """(first step, CPU medians per step, wall medians per step), seconds."""
    give_grads = _grad_giver(params, kind)
    give_grads()
    gc.collect()
    start = time.thread_time()
    opt.step()
    first = time.thread_time() - start
    cpu, wall = [], []
    gc.collect()
    gc.disable()
    try:
        for i in range(config.warmup + config.repeats):
            if kind != "same grads" or i == 0:
                give_grads()
            start_wall, start = time.perf_counter(), time.thread_time()
            opt.step()
            elapsed, elapsed_wall = time.thread_time() - start, time.perf_counter() - start_wall
            if i >= config.warmup:
                cpu.append(elapsed)
                wall.append(elapsed_wall)
    finally:
        gc.enable()
    return first, statistics.median(cpu), statistics.median(wall)


TORCH_FUSED = "torch fused (whole CPU step)"


def measure(config: HostBenchConfig, mode: str, torch_fused: bool = False) -> dict:
    """One row: ``mode``'s steps, ours (launches stubbed) or torch fused's (``mode`` one of
    TORCH_MODES).

    Must run in a process of its own with ``TRITON_INTERPRET=1`` set before triton's import
    (``run`` spawns one per row: in a process that already stepped another model the heap is
    laid out otherwise, and the same step measured 10-30% slower there).
    """
    import torch

    from triton_adam.bench.fsdp2 import _stub_launches

    import triton_adam

    torch.set_num_threads(1)
    _stub_launches()
    torch.manual_seed(0)
    n = config.tensors
    if torch_fused:
        if mode not in TORCH_MODES:
            raise ValueError(f"torch fused is timed with {TORCH_MODES}, not {mode!r}")
        params = [torch.nn.Parameter(torch.randn(config.numel)) for _ in range(n)]
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        provider = TORCH_FUSED
    else:
        options = _options(mode)
        dtype = options.pop("dtype", torch.float32)
        params = [torch.nn.Parameter(torch.randn(config.numel, dtype=dtype)) for _ in range(n)]
        opt = triton_adam.AdamW(params, lr=1e-3, backend="triton", **options)
        provider = "triton-adam (launches stubbed)"
    first, cpu, wall = _timed_steps(opt, params, config, grads_kind(mode))
    return {"provider": provider, "mode": mode, "first_us_per_tensor": 1e6 * first / n,
            "us_per_tensor": 1e6 * cpu / n, "wall_us_per_tensor": 1e6 * wall / n}


def _measure_apart(config: HostBenchConfig, mode: str, timeout_s: float,
                   torch_fused: bool = False) -> dict:
    """``measure`` in a fresh interpreter (stubbed launches, interpreter flag), bounded."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = ("import json, sys\n"
            "from triton_adam.bench.host import HostBenchConfig, measure\n"
            "config = HostBenchConfig(**json.loads(sys.argv[1]))\n"
            "print(json.dumps(measure(config, sys.argv[2], sys.argv[3] == '1')))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(asdict(config)), mode,
                           "1" if torch_fused else "0"],
                          env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"the host benchmark ({mode}) failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _median_row(samples: list) -> dict:
    """One row from its processes' rows: the median of each figure, every sample kept."""
    row = dict(samples[0])
    for key in ("first_us_per_tensor", "us_per_tensor", "wall_us_per_tensor"):
        row[key] = statistics.median(sample[key] for sample in samples)
    row["us_per_tensor_per_process"] = [sample["us_per_tensor"] for sample in samples]
    return row


def run(config: HostBenchConfig, timeout_s: float = 600.0) -> dict:
    """Every mode, ours and torch fused's, each in a process of its own (``config.rounds``
    rounds of them): a JSON-able record."""
    jobs = [(mode, False) for mode in config.modes] + [(mode, True) for mode in TORCH_MODES]
    samples = {job: [] for job in jobs}
    for _ in range(max(config.rounds, 1)):
        for mode, torch_fused in jobs:
            samples[mode, torch_fused].append(
                _measure_apart(config, mode, timeout_s, torch_fused=torch_fused))
    rows = [_median_row(samples[mode, False]) for mode in config.modes]
    torch_rows = {mode: _median_row(samples[mode, True]) for mode in TORCH_MODES}
    rows += torch_rows.values()
    for row in rows:
        like = torch_rows[grads_kind(row["mode"])]
        row["torch_fused_over_this"] = torch_rows["same grads"]["us_per_tensor"] / row[
            "us_per_tensor"]
        row["like_for_like_torch_fused_over_this"] = like["us_per_tensor"] / row["us_per_tensor"]
    return {"config": dict(asdict(config), modes=list(config.modes), device="cpu",
                           timer="thread_time", threads=1, process_per_row=True),
            "results": rows}
