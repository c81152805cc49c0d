"""What reading a step's inputs costs from Python, pass by pass: the floor under any host path.

A steady step must, per tensor, read each param's grad, each param's address (``module.to()``
moves params by ``.data =``), each grad's address, and for new grad objects check their dtype,
layout, sizes and strides (the ``.grad`` setter checks no strides, ``.data =`` nothing). This
times each of those reads alone as one C-level pass over 4096 tensors of 16 elements (thread
CPU time, median of the repeats, the collector off), for grads made three ways, each in a
process of its own (the heap's layout changes the figures):

* ``same``: the same grad tensors at every step;
* ``fresh``: ``p.grad = g.clone()`` before each step (each grad's Python object exists);
* ``backward``: grads from a real backward pass (no Python object exists for them yet: the
  first ``p.grad`` read makes one), as in training.

The sum of the passes is the least a Python step that confirms its inputs can cost; compare it
with ``triton-adam bench --host`` (the whole steady step) and with torch fused's step there.

    python perf/host_floor.py [--tensors 4096] [--repeats 30] [--json out.json]
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time

KINDS = ("same", "fresh", "backward")


def measure(kind: str, tensors: int, repeats: int) -> dict:
    """Median thread CPU time per tensor (ns) of each pass, grads made the ``kind`` way."""
    from operator import attrgetter

    import numpy as np
    import torch
    from torch import Tensor

    torch.set_num_threads(1)
    torch.manual_seed(0)
    read_grad = attrgetter("grad")
    params = [torch.nn.Parameter(torch.randn(16)) for _ in range(tensors)]
    pool = [torch.randn(16) for _ in range(tensors)]

    def give_grads():
        if kind == "backward":
            for p in params:
                p.grad = None
            torch.stack([(p * w).sum() for p, w in zip(params, pool)]).sum().backward()
        else:
            for p, g in zip(params, pool):
                p.grad = g.clone() if kind == "fresh" else g

    give_grads()
    first = list(map(read_grad, params))
    try:
        from torch._C._dynamo.guards import TensorGuards

        guard = TensorGuards(*first, dynamic_dims_sizes=[list(g.size()) for g in first],
                             dynamic_dims_strides=[list(g.stride()) for g in first])
    except Exception:  # noqa: BLE001 - a torch without dynamo's guard: that pass is left out
        guard = None
    del first
    timings: dict = {}
    gc.collect()
    gc.disable()
    try:
        for i in range(repeats + 2):
            if kind != "same" or i == 0:
                give_grads()
            grads = None
            for name in ("p.grad", "p.grad again", "id(grad)", "param data_ptr",
                         "grad data_ptr", "grad addresses as numpy", "tensor guard"):
                start = time.thread_time_ns()
                if name in ("p.grad", "p.grad again"):
                    grads = list(map(read_grad, params))
                elif name == "id(grad)":
                    list(map(id, grads))
                elif name == "param data_ptr":
                    list(map(Tensor.data_ptr, params))
                elif name == "grad data_ptr":
                    list(map(Tensor.data_ptr, grads))
                elif name == "grad addresses as numpy":
                    np.fromiter(map(Tensor.data_ptr, grads), dtype=np.int64, count=tensors)
                elif guard is not None:
                    guard.check(*grads)
                elapsed = time.thread_time_ns() - start
                if i >= 2:
                    timings.setdefault(name, []).append(elapsed / tensors)
            del grads
    finally:
        gc.enable()
    return {name: statistics.median(values) for name, values in timings.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)  # one process's part
    args = parser.parse_args(argv)
    if args.kind:
        print(json.dumps(measure(args.kind, args.tensors, args.repeats)))
        return 0
    results = {}
    for kind in KINDS:
        done = subprocess.run([sys.executable, __file__, "--kind", kind, "--tensors",
                               str(args.tensors), "--repeats", str(args.repeats)],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise SystemExit(f"{kind}: {done.stderr[-2000:]}")
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    names = list(results["same"])
    print(f"ns per tensor, {args.tensors} tensors of 16 elements, thread CPU time, median of "
          f"{args.repeats}")
    print(f"{'pass':26s}" + "".join(f"{kind + ' grads':>18s}" for kind in KINDS))
    for name in names:
        print(f"{name:26s}" + "".join(f"{results[kind][name]:18.1f}" for kind in KINDS))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tensors": args.tensors, "repeats": args.repeats,
                       "ns_per_tensor": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
