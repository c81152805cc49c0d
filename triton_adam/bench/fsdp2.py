"""Host time of ``step()`` under FSDP2: triton-adam vs torch's fused AdamW on one sharded model.

Under FSDP2 every param, grad and state is a DTensor, and torch's optimizers pay DTensor dispatch
for every tensor at every step (pytorch issue 134191: the optimizer at a third of step time).
This runs a world of gloo processes on loopback (CPU), shards a stack of small layers with
``fully_shard`` (one call per layer, as in a real model), and times ``step()`` on rank 0 with
fresh grads from a backward pass before every step (thread CPU time of ``step()``):

* ``triton-adam (launches stubbed)``: the Triton path with its kernel launches replaced by
  no-ops, i.e. exactly what the host pays per step before the GPU does any work (tables, grad
  addresses, DTensor unwrapping, uploads);
* ``torch fused``: ``torch.optim.AdamW(fused=True)`` as users run it on the DTensors; its CPU
  kernel work on these tiny tensors is small next to its dispatch, so this is mostly host time;
* ``triton-adam (torch backend)``: ours on torch's fused CPU kernel, real work included, for a
  like-for-like figure with the line above.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass


@dataclass
class Fsdp2BenchConfig:
    """A stack of ``layers`` blocks (Linear(width, width) + LayerNorm(width): 4 tensors each),
    each block sharded with ``fully_shard`` over ``world_size`` processes."""
    world_size: int = 2
    layers: int = 256
    width: int = 32
    warmup: int = 3
    repeats: int = 20


# A world that has not finished by then is killed: every collective is bounded (120 s) too.
WORLD_TIMEOUT_S = 1800.0

PROVIDERS = ("triton-adam (launches stubbed)", "torch fused", "triton-adam (torch backend)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub_launches() -> None:
    """Replace the Triton launches with no-ops: what is left of ``step()`` is host work."""
    from triton_adam.kernels import adam_step, grad_norm

    def nothing(*args, **kwargs):
        return None

    for module, names in ((adam_step, ("launch_adam_step", "launch_adam_coefficients")),
                          (grad_norm, ("launch_grad_norm_partials", "launch_grad_norm_finalize",
                                       "launch_grad_norm_segments"))):
        for name in names:
            setattr(module, name, nothing)


def _build_model(config: Fsdp2BenchConfig):
    import torch
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(config.width, config.width), nn.LayerNorm(config.width))
              for _ in range(config.layers)]
    model = nn.Sequential(*blocks)
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _time_provider(name: str, config: Fsdp2BenchConfig, rank: int) -> list:
    import torch

    import triton_adam

    model = _build_model(config)
    if name == "torch fused":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    else:
        backend = "torch" if name.endswith("(torch backend)") else "triton"
        opt = triton_adam.AdamW(model.parameters(), lr=1e-3, backend=backend)
    x = torch.randn(2, config.width, generator=torch.Generator().manual_seed(rank))
    times = []
    for i in range(config.warmup + config.repeats):
        model(x).square().mean().backward()  # new grads at new addresses, as in training
        # thread CPU time (the wall clock of a shared machine counts the other rank's and
        # other processes' slices), the collector off for the step alone (a collection the
        # backward's garbage triggers is not the step's)
        gc.disable()
        start = time.thread_time()
        opt.step()
        elapsed = time.thread_time() - start
        gc.enable()
        opt.zero_grad(set_to_none=True)
        if i >= config.warmup:
            times.append(elapsed * 1e3)
    return times


def _worker(rank: int, config: Fsdp2BenchConfig, port: int, out_path: str) -> None:
    # The interpreter flag makes the Triton path run on CPU tensors; its launches are stubbed.
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=config.world_size,
                            timeout=datetime.timedelta(seconds=120))
    try:
        _stub_launches()
        results = {}
        for name in PROVIDERS:
            results[name] = _time_provider(name, config, rank)
            dist.barrier()
        if rank == 0:
            with open(out_path, "w") as f:
                json.dump(results, f)
    finally:
        # FSDP2's modules, DTensor params and states sit in reference cycles (thousands of
        # objects here) that only the collector frees. Left to interpreter exit, they go after
        # gloo's threads and the rank dies in std::terminate (SIGABRT, about 1 run in 10 on
        # 2 cores); freed now, while the process group is alive, they go cleanly.
        gc.collect()
        dist.destroy_process_group()


def _join_within(context, timeout_s: float) -> None:
    """Join every process of ``context`` (re-raising a rank's failure), killing all of them if
    they are not done within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the FSDP2 benchmark world did not finish in {timeout_s:g} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join(timeout=10)


def run(config: Fsdp2BenchConfig) -> dict:
    """Run the world and return a JSON-able record: config, per-provider median host ms."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "times.json")
        context = mp.start_processes(_worker, args=(config, _free_port(), out_path),
                                     nprocs=config.world_size, start_method="spawn", join=False)
        _join_within(context, WORLD_TIMEOUT_S)
        with open(out_path) as f:
            times = json.load(f)
    n_tensors = 4 * config.layers
    rows = []
    for name in PROVIDERS:
        median = statistics.median(times[name])
        rows.append({"provider": name, "host_median_ms": median, "min_ms": min(times[name]),
                     "us_per_tensor": 1e3 * median / n_tensors, "repeats": len(times[name])})
    fused = next(r for r in rows if r["provider"] == "torch fused")["host_median_ms"]
    for row in rows:
        row["torch_fused_over_this"] = fused / row["host_median_ms"]
    return {"config": dict(asdict(config), tensors=n_tensors, device="cpu", backend="gloo"),
            "results": rows}
