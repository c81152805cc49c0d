"""``clip_grad_norm_``: torch's function, with the norm as one multi-tensor Triton reduction."""
from __future__ import annotations

import torch
from torch import Tensor

from ._grad_norm import NORM_CODES, NormSource, TritonGradNorm
from ._plan import TRITON_PARAM_DTYPES, interpreter_enabled


def _triton_can_reduce(grads, norm_type) -> bool:
    devices = {g.device for g in grads}
    if len(devices) != 1 or float(norm_type) not in NORM_CODES:
        return False
    device = next(iter(devices))
    if not (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())):
        return False
    return all(g.dtype in TRITON_PARAM_DTYPES and g.layout is torch.strided
               and g.is_contiguous() for g in grads)


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None) -> Tensor:
    """Clip the gradients' global norm in place, as ``torch.nn.utils.clip_grad_norm_``.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest allowed norm.
        norm_type: 2.0, 1.0 or ``inf`` run on the Triton reduction (one launch per grad dtype,
            float32 accumulation, fixed reduction order: the same grads give the same bits);
            any other order, grads on several devices or outside CUDA (CPU without
            ``TRITON_INTERPRET=1``) use torch's own function.
        error_if_nonfinite: raise if the norm is NaN or inf (this reads the norm on the host).
        foreach: accepted for compatibility; the scaling uses torch's foreach multiply.

    Returns:
        The total norm of the gradients (viewed as one vector), a 0-d tensor in the grads'
        promoted dtype, as torch returns it.
    """
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    if not _triton_can_reduce(grads, norm_type):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type,
                                              error_if_nonfinite, foreach)
    by_dtype = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    sources = [NormSource.from_grads(group) for group in by_dtype.values()]
    norm, _ = TritonGradNorm(sources, device=grads[0].device).run(sources, norm_type=norm_type)
    result_dtype = grads[0].dtype
    for g in grads[1:]:
        result_dtype = torch.promote_types(result_dtype, g.dtype)
    total_norm = norm.to(result_dtype)
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")
    # As torch: the factor in the norm's dtype, clamped (NaN stays NaN), one foreach multiply.
    clip_coef = max_norm / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    for group in by_dtype.values():
        torch._foreach_mul_(group, clip_coef_clamped.to(group[0].device))
    return total_norm
