"""``clip_grad_norm_``: torch's function, with the norm as one multi-tensor Triton reduction."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from . import _distributed
from ._grad_norm import NORM_CODES, NormSource, TritonGradNorm
from ._plan import TRITON_PARAM_DTYPES, interpreter_enabled
from ._tables import to_device
from ._torch_backend import segment_totals


def _triton_can_reduce(grads, norm_type) -> bool:
    devices = {g.device for g in grads}
    if len(devices) != 1 or float(norm_type) not in NORM_CODES:
        return False
    device = next(iter(devices))
    if not (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())):
        return False
    return all(g.dtype in TRITON_PARAM_DTYPES and g.layout is torch.strided
               and g.is_contiguous() for g in grads)


def _raise_if_nonfinite(total_norm, norm_type):
    if torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`")


def _scale(grads, max_norm, total_norm):
    # As torch: the factor in the norm's dtype, clamped (NaN stays NaN), one foreach multiply
    # per dtype and device.
    clip_coef = max_norm / (total_norm + 1e-6)
    clip_coef_clamped = torch.clamp(clip_coef, max=1.0)
    by_kind = {}
    for g in grads:
        by_kind.setdefault((g.dtype, g.device), []).append(g)
    for group in by_kind.values():
        torch._foreach_mul_(group, clip_coef_clamped.to(group[0].device))


def clip_grad_norm_(parameters, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach=None) -> Tensor:
    """Clip the gradients' global norm in place, as ``torch.nn.utils.clip_grad_norm_``.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped. DTensor
            params (FSDP2, HSDP, tensor parallel, several meshes, mixed with plain tensors) give
            the norm of the whole model: local totals, then one all-reduce per mesh dimension
            on the device (every rank must call this with the same params, as with torch).
        max_norm: the largest allowed norm.
        norm_type: 2.0, 1.0 or ``inf`` run on the Triton reduction (one launch per grad dtype,
            float32 accumulation, fixed reduction order: the same grads give the same bits);
            any other order, grads on several devices or outside CUDA (CPU without
            ``TRITON_INTERPRET=1``) use torch's own function (or, for DTensors, torch ops).
        error_if_nonfinite: raise if the norm is NaN or inf (this reads the norm on the host).
        foreach: accepted for compatibility; the scaling uses torch's foreach multiply.

    Returns:
        The total norm of the gradients (viewed as one vector), a 0-d tensor in the grads'
        promoted dtype, as torch returns it; for DTensor grads a plain tensor holding the full
        norm on every rank (torch returns a DTensor to call ``full_tensor()`` on).
    """
    parameters = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    reduction = _distributed.NormReduction(parameters)
    if reduction.distributed:
        return _clip_distributed(parameters, reduction, max_norm, float(norm_type),
                                 error_if_nonfinite)
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
    total_norm = norm.to(_result_dtype(grads))
    if error_if_nonfinite:
        _raise_if_nonfinite(total_norm, norm_type)
    _scale(grads, max_norm, total_norm)
    return total_norm


def _result_dtype(grads):
    result_dtype = grads[0].dtype
    for g in grads[1:]:
        result_dtype = torch.promote_types(result_dtype, g.dtype)
    return result_dtype


def _clip_distributed(parameters, reduction, max_norm, norm_type, error_if_nonfinite):
    """The norm over every rank's shards, then each rank scales its local grads."""
    if not (norm_type > 0):
        raise ValueError(f"clip_grad_norm_ of DTensor grads takes norm_type > 0 or inf, got "
                         f"{norm_type} (the norm is reduced across ranks from p-th powers)")
    with_grads = [p for p in parameters if p.grad is not None]
    device = parameters[0].device
    # norms of the grads as their params are placed (a Partial grad is reduced first); the
    # scaling goes to the grads' own memory, which is linear in any placement
    locals_ = [_distributed.local_grad(p, p.grad, lambda i=i: f"param {i}")
               for i, p in enumerate(with_grads)]
    memory = [_distributed.local(p.grad) for p in with_grads]
    segments = [reduction.segment_index(p) for p in with_grads]
    n_segments = len(reduction.segments)
    nonempty = [i for i, g in enumerate(locals_) if g.numel() > 0]
    kept = [locals_[i] for i in nonempty]
    if kept and _triton_can_reduce(kept, norm_type):
        sources, of_partial = [], []
        by_kind = {}
        for i in nonempty:
            by_kind.setdefault((segments[i], locals_[i].dtype), []).append(locals_[i])
        for (segment, _), grads in by_kind.items():
            source = NormSource.from_grads(grads)
            sources.append(source)
            of_partial.append(np.full(source.n_blocks, segment, dtype=np.int32))
        of_partial = to_device(np.concatenate(of_partial + [np.zeros(1, np.int32)]), device)
        runner = TritonGradNorm(sources, device=device)
        totals, flag = runner.run_segments(sources, of_partial, n_segments, norm_type)
    else:
        index = to_device(np.array([segments[i] for i in nonempty], dtype=np.int64), device)
        # the non-finite flag keeps a NaN that a MAX all-reduce may drop (inf-norm)
        totals, flag = segment_totals(kept, index, n_segments, device,
                                      check_nonfinite=norm_type == float("inf"),
                                      norm_type=norm_type)
    total, _ = reduction.reduce(totals, flag, norm_type)
    total_norm = _distributed.finish_norm(total, norm_type)
    if with_grads:
        total_norm = total_norm.to(_result_dtype(memory))
    if error_if_nonfinite:
        _raise_if_nonfinite(total_norm, norm_type)
    _scale([g for g in memory if g.numel() > 0], max_norm, total_norm)
    return total_norm
