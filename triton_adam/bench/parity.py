"""Short parity self-test: triton_adam.AdamW against torch.optim.AdamW(foreach=False)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Odd sizes on purpose: 1 element, non-multiples of 4 and of any block size, a 2-D tensor.
SHAPES = [(1,), (3,), (1000,), (4097,), (64, 65), (3, 5, 7)]
# Pass/fail is judged on the update error ||ours - ref|| / ||ref - init||: how wrong the parameter
# movement is, relative to the movement. Element-wise errors cannot judge low precision: torch's
# for-loop path rounds after every bf16/fp16 op, a fused kernel once, so even torch's own fused
# AdamW differs from it by a whole ulp of the largest params (measured on CPU, 5 steps: update
# error 0.06 bf16, 0.027 fp16, <1e-6 fp32; a 10% lr error gives 0.14 / 0.11 / 0.1).
UPDATE_TOLERANCES = {"fp32": 1e-4, "bf16": 0.1, "fp16": 0.05}


@dataclass
class ParityResult:
    """Worst parameter error of one dtype after ``steps`` steps."""

    dtype: str
    steps: int
    numel: int
    max_abs: float
    max_rel: float
    update_rel_err: float
    tolerance: float
    within_tolerance: bool


def _flat(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().cpu().flatten() for t in ts])


def update_error(got, want, init) -> float:
    """||got - want|| / ||want - init||; inf when got is not finite where want is."""
    g, w, i = _flat(got), _flat(want), _flat(init)
    diff = (g - w).norm().item()
    moved = (w - i).norm().item()
    if diff != diff:  # NaN
        return float("inf")
    return diff / moved if moved else (0.0 if diff == 0 else float("inf"))


def _max_errors(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor], atol, rtol):
    """(max abs error, max relative error, all within atol + rtol*|want|), NaN-aware."""
    max_abs = max_rel = 0.0
    ok = True
    for a, b in zip(got, want):
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        diff = (a64 - b64).abs()
        # NaN/inf where the other side is finite is an infinite error, never a silent 0
        # (Python's max() would skip NaN); matching non-finite values count as equal.
        same_nonfinite = ~torch.isfinite(a64) & ~torch.isfinite(b64) & ((a64 == b64) | (a64 != a64) & (b64 != b64))
        diff = torch.where(same_nonfinite, torch.zeros_like(diff), diff)
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
        # Relative to the reference; where it is exactly 0 the absolute error stands in.
        rel = torch.where(b64 != 0, diff / b64.abs(), diff)
        rel = torch.where(same_nonfinite, torch.zeros_like(rel), rel)
        max_abs = max(max_abs, diff.max().item())
        max_rel = max(max_rel, rel.max().item())
        ok = ok and bool((diff <= atol + rtol * b64.abs()).all())
    return max_abs, max_rel, ok


def run_parity(
    make_optimizer: Callable[..., torch.optim.Optimizer],
    device: torch.device,
    dtypes: Sequence[str] = ("fp32", "bf16", "fp16"),
    steps: int = 5,
    lr: float = 1e-2,
    weight_decay: float = 1e-2,
    seed: int = 0,
) -> List[ParityResult]:
    """Step ``make_optimizer`` (e.g. ``triton_adam.AdamW``) and torch's for-loop AdamW on equal
    random params with equal random grads, and report the worst parameter difference per dtype.

    lr is 1e-2 so that updates move bf16 params by more than one ulp within a few steps.
    """
    out: List[ParityResult] = []
    for name in dtypes:
        dtype = DTYPES[name]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        init = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in SHAPES]
        ours = [t.clone().requires_grad_(True) for t in init]
        ref = [t.clone().requires_grad_(True) for t in init]
        opt = make_optimizer(ours, lr=lr, weight_decay=weight_decay)
        ref_opt = torch.optim.AdamW(ref, lr=lr, weight_decay=weight_decay, foreach=False)
        for _ in range(steps):
            for a, b in zip(ours, ref):
                g = torch.randn(a.shape, generator=gen)
                # torch keeps fp16 states in fp16, where (1-beta2)*g*g underflows for |g| below
                # ~8e-3 and eps=1e-8 rounds to 0: the reference itself would divide by zero.
                g = torch.where(g < 0, -1.0, 1.0) * g.abs().clamp_min(0.1)
                g = g.to(device=device, dtype=dtype)
                a.grad = g.clone()
                b.grad = g.clone()
            opt.step()
            ref_opt.step()
        max_abs, max_rel, _ = _max_errors(ours, ref, 0.0, 0.0)
        err = update_error(ours, ref, init)
        tol = UPDATE_TOLERANCES[name]
        out.append(ParityResult(name, steps, sum(t.numel() for t in init), max_abs, max_rel,
                                err, tol, err <= tol))
    return out


def torch_fused_adamw(params, **kw) -> torch.optim.Optimizer:
    """torch's fused AdamW: shows how far a correct single-rounding kernel lands from the
    for-loop reference, as context for the figures of the optimizer under test."""
    return torch.optim.AdamW(params, fused=True, **kw)


def load_triton_adamw() -> "tuple[Optional[Callable[..., torch.optim.Optimizer]], Optional[str]]":
    """(triton_adam.AdamW, None), or (None, reason) while the optimizer does not exist yet."""
    try:
        import triton_adam

        return triton_adam.AdamW, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def as_dicts(results: Sequence[ParityResult]) -> List[Dict]:
    return [r.__dict__.copy() for r in results]
