"""Which optimizer implementation each experiment uses, decided at run time.

The experiments prefer ``triton_adam`` (that is what they are about) but must
not break when it is missing or lacks an option: each factory returns the
optimizer *and* a label naming the implementation, which goes in the report.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch

from .reference_adam import ReferenceAdam


def triton_adam_module() -> Optional[Any]:
    """The ``triton_adam`` module if it provides Adam and AdamW, else None."""
    try:
        import triton_adam
    except Exception:  # a half-written package must not take the experiments down
        return None
    if hasattr(triton_adam, "Adam") and hasattr(triton_adam, "AdamW"):
        return triton_adam
    return None


def supports(cls: type, keyword: str) -> bool:
    """Whether ``cls.__init__`` accepts ``keyword`` (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params


def default_backend() -> str:
    """``auto`` lets triton_adam pick Triton on GPU and its torch fallback on CPU."""
    return "auto"


def _backend_label(backend: str, params: list) -> str:
    # What "auto" resolves to, so the report says which code ran: Triton on
    # CUDA (or under the interpreter), torch's kernels otherwise.
    if backend != "auto":
        return f"backend={backend!r}"
    first = next((p for p in params if isinstance(p, torch.Tensor)), None)
    if first is not None and first.is_cuda:
        return "backend='auto' = Triton kernels"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "backend='auto' = Triton interpreter"
    return "backend='auto' = torch fallback on CPU"


def make_adam(params, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
              bias_correction: bool = True, backend: Optional[str] = None) -> tuple[torch.optim.Optimizer, str]:
    """Adam with L2 weight decay (and optionally no bias correction).

    Order of preference: triton_adam.Adam, then ``torch.optim.Adam`` when only
    the standard algorithm is needed, then :class:`ReferenceAdam`.
    """
    ta = triton_adam_module()
    backend = backend or default_backend()
    params = list(params)
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if ta is not None and (bias_correction or supports(ta.Adam, "bias_correction")):
        extra = {} if bias_correction else {"bias_correction": False}
        return ta.Adam(params, backend=backend, **kw, **extra), f"triton_adam.Adam ({_backend_label(backend, params)})"
    if bias_correction:
        return torch.optim.Adam(params, **kw), "torch.optim.Adam"
    return (ReferenceAdam(params, **kw, bias_correction=False, weight_decay_mode="l2"),
            "ReferenceAdam (experiments/reference_adam.py)")


def make_adamw(params, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
               schedule_decay: bool = False, bias_correction: bool = True,
               backend: Optional[str] = None) -> tuple[torch.optim.Optimizer, str]:
    """AdamW in torch's ``lr * wd`` form, or with ``schedule_decay`` the paper's ``eta_t * wd`` form."""
    ta = triton_adam_module()
    backend = backend or default_backend()
    params = list(params)
    kw = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    need = {}
    if schedule_decay:
        need["weight_decay_mode"] = "schedule"
    if not bias_correction:
        need["bias_correction"] = False
    if ta is not None and all(supports(ta.AdamW, k) for k in need):
        options = "".join(f", {k}={v!r}" for k, v in need.items())
        return ta.AdamW(params, backend=backend, **kw, **need), \
            f"triton_adam.AdamW ({_backend_label(backend, params)}{options})"
    if not need:
        return torch.optim.AdamW(params, **kw), "torch.optim.AdamW"
    mode = "schedule" if schedule_decay else "decoupled"
    return (ReferenceAdam(params, **kw, bias_correction=bias_correction, weight_decay_mode=mode),
            f"ReferenceAdam (experiments/reference_adam.py, weight_decay_mode={mode!r})")
