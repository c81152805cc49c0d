"""Explicit model of the bytes one Adam/AdamW step moves through memory.

Per element, a step reads p, g, m, v and writes p, m, v, each at its own dtype's size; amsgrad adds
a read and a write of max_exp_avg_sq. fp32 AdamW: 16 B read + 12 B written = 28 B/elem; amsgrad
36 B/elem; bf16 params/grads with bf16 states 14 B/elem (fp32 states: 22 B/elem).

Per-step scalars (step counters, lr, AMP grad_scale/found_inf) are a few bytes per launch, not
per element, and are counted as zero: NEGLIGIBLE_NOTE says so in every report.

For optimizers whose state is not plain m/v (8-bit blockwise states with per-block scales, Kahan
buffers, ...), ``bytes_from_optimizer_state`` counts what the optimizer actually keeps: every
non-scalar state tensor is assumed read and written once per step.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

NEGLIGIBLE_NOTE = (
    "bytes/step = sum over params of numel * (2*param + grad + 2*each per-element state) sizes; "
    "scalars (step, lr, AMP grad_scale/found_inf) are counted as 0 B (negligible)"
)


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of a torch dtype."""
    return torch.empty((), dtype=dtype).element_size()


def adam_bytes_per_element(
    param_dtype: torch.dtype,
    grad_dtype: Optional[torch.dtype] = None,
    state_dtype: Optional[torch.dtype] = None,
    amsgrad: bool = False,
) -> int:
    """Bytes moved per parameter element by one Adam/AdamW step.

    ``grad_dtype`` and ``state_dtype`` default to ``param_dtype`` (what torch.optim does:
    its states are ``zeros_like(param)``).
    """
    p = dtype_size(param_dtype)
    g = dtype_size(grad_dtype or param_dtype)
    s = dtype_size(state_dtype or param_dtype)
    n_states = 3 if amsgrad else 2  # exp_avg, exp_avg_sq, (max_exp_avg_sq)
    return 2 * p + g + 2 * n_states * s


def adam_step_bytes(
    numels: Iterable[int],
    param_dtype: torch.dtype,
    grad_dtype: Optional[torch.dtype] = None,
    state_dtype: Optional[torch.dtype] = None,
    amsgrad: bool = False,
) -> int:
    """Bytes moved by one step over tensors of the given element counts."""
    per = adam_bytes_per_element(param_dtype, grad_dtype, state_dtype, amsgrad)
    return per * sum(int(n) for n in numels)


def _tensor_bytes(t: torch.Tensor) -> Optional[int]:
    """Storage bytes of a tensor, looking inside wrapper subclasses (torchao's quantized states)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        try:
            names, _ = t.__tensor_flatten__()
        except Exception:
            return None
        total = 0
        for n in names:
            inner = getattr(t, n)
            b = _tensor_bytes(inner)
            if b is None:
                return None
            total += b
        return total
    return t.numel() * t.element_size()


def bytes_from_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Optional[int]:
    """Bytes one step moves, counting the optimizer's own per-element state.

    Reads and writes each param, reads each grad, and reads and writes every state tensor of
    more than zero dimensions (0-d tensors are step counters and scales: negligible). Returns
    None when a state tensor's size cannot be determined or no state is found, so callers mark
    the figure n/a.
    Call after at least one step, once the state exists.
    """
    total = 0
    found_state = False
    for p in params:
        total += 2 * p.numel() * p.element_size()
        g = p.grad
        total += (g.numel() * g.element_size()) if g is not None else 0
        state = optimizer.state.get(p, {})
        for value in state.values():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            b = _tensor_bytes(value)
            if b is None:
                return None
            found_state = True
            total += 2 * b
    # State kept outside ``optimizer.state`` would be missed; better n/a than a flattering figure.
    return total if found_state else None
