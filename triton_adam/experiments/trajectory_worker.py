"""Train one AdamW trajectory; also the entry point of the Triton-interpreter subprocess.

Triton's interpreter is chosen by ``TRITON_INTERPRET=1`` at the moment
``triton`` is first imported, so on a machine without a GPU the Triton-kernel
run happens in a fresh process started by :mod:`.trajectory` with that
variable set. That process runs ``python -m triton_adam.experiments.trajectory_worker
SPEC.json OUT.json`` and hands its results back as JSON (floats round-trip
exactly through ``repr``).
"""
from __future__ import annotations

import json
import sys
import time

import torch
from torch.nn import functional as F

IMPLEMENTATIONS = ("torch.optim", "torch.optim.fused", "torch.optim.ulp", "fallback", "triton")

# One set of hyper-parameters for every trajectory, with weight decay on so the
# decoupled decay path is exercised too.
HYPER = dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def make_optimizer(impl: str, params):
    """``torch.optim.AdamW`` (default or fused) or ``triton_adam.AdamW`` with the torch or triton backend."""
    if impl in ("torch.optim", "torch.optim.ulp"):
        return torch.optim.AdamW(params, **HYPER)
    if impl == "torch.optim.fused":
        # torch's own second implementation: its distance to the default one
        # is the rounding noise floor any faithful reimplementation sits at.
        return torch.optim.AdamW(params, fused=True, **HYPER)
    import triton_adam  # imported late: the interpreter flag must already be set

    backend = {"fallback": "torch", "triton": "triton"}[impl]
    return triton_adam.AdamW(params, backend=backend, **HYPER)


def train_one(impl: str, hidden: list[int], steps: int, seed: int = 0, device: str = "cpu",
              threads: int = 1) -> dict:
    """Full-batch training of a digits MLP; returns losses, final weights and timing."""
    from .data import load
    from .models import mlp, n_parameters

    torch.set_num_threads(threads)
    data = load(seed=seed).to(device)
    model = mlp(hidden, seed=seed).to(device)
    if impl == "torch.optim.ulp":
        # Every initial weight moved by one float32 ulp: how far such a
        # rounding-sized nudge travels measures how chaotic the trajectory is.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    opt = make_optimizer(impl, model.parameters())
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(data.x_train), data.y_train)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().tolist()
    return dict(impl=impl, hidden=list(hidden), steps=steps, losses=losses, weights=weights,
                n_params=n_parameters(model), seconds=seconds, device=device,
                optimizer=f"{type(opt).__module__}.{type(opt).__name__}")


def main(argv=None) -> int:
    """Subprocess entry: run every job in SPEC.json, write the results to OUT.json."""
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = argv
    with open(spec_path) as fh:
        jobs = json.load(fh)
    results = []
    for job in jobs:
        try:
            results.append(train_one(**job))
        except Exception as exc:  # report, do not hide: the parent puts it in the report
            results.append(dict(job, error=f"{type(exc).__name__}: {exc}"))
        # Flush partial results after every job so a timeout still leaves something.
        with open(out_path, "w") as fh:
            json.dump(results, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
