"""Explicit model of the bytes one Adam/AdamW step moves through memory.

Per element, a step reads p, g, m, v and writes p, m, v, each at its own dtype's size; amsgrad adds
a read and a write of max_exp_avg_sq. fp32 AdamW: 16 B read + 12 B written = 28 B/elem; amsgrad
36 B/elem; bf16 params/grads with bf16 states 14 B/elem (fp32 states: 22 B/elem).

Per-step scalars (step counters, lr, AMP grad_scale/found_inf) are a few bytes per launch, not
per element, and are counted as zero: NEGLIGIBLE_NOTE says so in every report.

For optimizers whose state is not plain m/v (8-bit blockwise states with per-block scales, Kahan
buffers, ...), ``bytes_from_optimizer_state`` counts what the optimizer actually keeps: every
non-scalar state tensor is assumed read and written once per step. ``held_bytes`` counts the same
tensors once: the memory an optimizer holds besides params and grads (states + master), the
baseline of the precision work (fp32 AdamW: 8 B per param).

Gradient clipping (``bench --clip MAX_NORM``) adds passes over the grads, at the grad dtype's size:
- torch's ``clip_grad_norm_`` reads every grad once for the norm, then reads and writes every grad
  to scale it (``_foreach_mul_``): +3 x grad bytes per element, on top of the step's own bytes.
- triton-adam's fused clip (``max_grad_norm=``) reads every grad once for the norm and folds the
  clip factor into the update kernel, which reads the grad anyway: +1 x grad bytes per element.
So fp32 AdamW with clipping is 28 + 12 = 40 B/elem for torch and 28 + 4 = 32 B/elem fused (20%
fewer); bf16 is 14 + 6 = 20 against 14 + 2 = 16 B/elem. The 0-d norm and clip factor are scalars
(0 B). On a device where triton-adam falls back to torch ops (a CPU without the Triton
interpreter) the fallback moves more than this; the figure stays the fused kernel's count.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

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
    extra_dtype: Optional[torch.dtype] = None,
) -> int:
    """Bytes moved per parameter element by one Adam/AdamW step.

    ``grad_dtype`` and ``state_dtype`` default to ``param_dtype`` (what torch.optim does:
    its states are ``zeros_like(param)``). ``extra_dtype``: the dtype of a per-element tensor
    read and written beside them (a float32 master, an int16 master remainder, a Kahan
    compensation), or None.
    """
    p = dtype_size(param_dtype)
    g = dtype_size(grad_dtype or param_dtype)
    return 2 * p + g + 2 * held_bytes_per_element(param_dtype, state_dtype, amsgrad, extra_dtype)


# quantised moments (triton_adam._quantize): bytes per code, elements per float32 scale
CODE_BYTES = {"int8": (1, 256), "fp8": (1, 256), "int4": (0.5, 128)}


def held_bytes_per_element(
    param_dtype: torch.dtype,
    state_dtype: Optional[torch.dtype] = None,
    amsgrad: bool = False,
    extra_dtype: Optional[torch.dtype] = None,
) -> int:
    """Bytes an Adam/AdamW optimizer holds per parameter element besides param and grad: its
    moments (in ``state_dtype``, default the param's) and an ``extra_dtype`` tensor if any."""
    n_states = 3 if amsgrad else 2  # exp_avg, exp_avg_sq, (max_exp_avg_sq)
    extra = dtype_size(extra_dtype) if extra_dtype is not None else 0
    if state_dtype in CODE_BYTES:  # codes, and a float32 scale per block
        code_bytes, block = CODE_BYTES[state_dtype]
        return n_states * (code_bytes + 4 / block) + extra
    return n_states * dtype_size(state_dtype or param_dtype) + extra


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


# Passes over the grads that clipping adds: torch reads for the norm, then reads + writes to scale;
# the fused step reads for the norm only (the update kernel scales in registers).
CLIP_GRAD_PASSES = {"torch": 3, "fused": 1}

CLIP_NOTE = (
    "clip bytes: torch clip_grad_norm_ + step adds 3 x grad bytes per element (norm read, scale "
    "read + write); triton-adam's fused clip adds 1 x grad bytes (norm read only)"
)


def clip_bytes_per_element(grad_dtype: torch.dtype, fused: bool) -> int:
    """Extra bytes per element that clipping the grads' global norm adds to one step."""
    return CLIP_GRAD_PASSES["fused" if fused else "torch"] * dtype_size(grad_dtype)


def clip_bytes(numels: Iterable[int], grad_dtype: torch.dtype, fused: bool) -> int:
    """Extra bytes clipping adds to a step over tensors of the given element counts."""
    return clip_bytes_per_element(grad_dtype, fused) * sum(int(n) for n in numels)


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


def _state_tensors(state: Any) -> Iterator[torch.Tensor]:
    """The per-element state tensors of one param's state: every tensor of more than zero
    dimensions, inside nested dicts too (heavyball keeps ``{0: {"..._exp_avg_0": ...}}``).
    0-d tensors are step counters and scales: negligible."""
    if isinstance(state, torch.Tensor):
        if state.dim() > 0:
            yield state
    elif isinstance(state, dict):
        for value in state.values():
            yield from _state_tensors(value)


def held_bytes(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Optional[int]:
    """Bytes the optimizer holds for ``params`` besides the params and grads: its per-element
    states, plus master weights or Kahan buffers where it keeps them in its state, at their
    storage size (codes + per-block scales for quantised states). None when no state is found
    (never stepped, or state kept outside ``optimizer.state``) or a state tensor's size cannot be
    determined. Call after at least one step, once the state exists."""
    total, found = 0, False
    for p in params:
        for t in _state_tensors(optimizer.state.get(p, {})):
            b = _tensor_bytes(t)
            if b is None:
                return None
            total, found = total + b, True
    return total if found else None


def bytes_from_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]
) -> Optional[int]:
    """Bytes one step moves, counting the optimizer's own per-element state.

    Reads and writes each param, reads each grad, and reads and writes every state tensor that
    ``held_bytes`` counts. None when ``held_bytes`` is None, so callers mark the figure n/a.
    Call after at least one step, once the state exists.
    """
    state = held_bytes(optimizer, params)
    if state is None:  # better n/a than a flattering figure
        return None
    total = 2 * state
    for p in params:
        total += 2 * p.numel() * p.element_size()
        g = p.grad
        total += (g.numel() * g.element_size()) if g is not None else 0
    return total
