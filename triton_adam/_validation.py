"""Checks on hyperparameters, params, grads and state, with errors that say which tensor and why.

Everything here only reads: the optimizer runs these checks before it touches any tensor, so a
failed ``step()`` leaves params and state exactly as they were.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor

from . import _distributed, _quantize



def _as_number(value):
    # detached: a differentiable step's tensor hyperparameters may require grad
    return float(value.detach()) if isinstance(value, Tensor) else value


def to_scalar(value):
    """Squeeze a 1-element tensor hyperparameter to 0-d, as torch does; numbers pass through."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.squeeze()
    return value


def check_hyperparameters(lr, betas, eps, weight_decay):
    """Raise ValueError for hyperparameters torch.optim.Adam refuses, with torch's messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= _as_number(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element")
        if not 0.0 <= _as_number(beta) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")


def check_formulation(eps_mode, weight_decay_mode):
    """Raise ValueError for an unknown eps_mode or weight_decay_mode."""
    if eps_mode not in ("torch", "paper"):
        raise ValueError(f"eps_mode must be 'torch' or 'paper', got {eps_mode!r}")
    if weight_decay_mode not in ("torch", "schedule"):
        raise ValueError(f"weight_decay_mode must be 'torch' or 'schedule', got "
                         f"{weight_decay_mode!r}")


# float16 moments only as float16 params' default: its range is too narrow for exp_avg_sq
STATE_DTYPES = (torch.float32, torch.bfloat16)


def check_state_dtype(state_dtype) -> None:
    """Raise ValueError for a state_dtype the kernels cannot hold moments in ("int8", "int4",
    "fp8": the blockwise codes of _quantize)."""
    if state_dtype is not None and state_dtype not in _quantize.FORMATS and \
            state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be None (the param's dtype), one of "
                         f"{[str(d) for d in STATE_DTYPES]} or a code format "
                         f"{list(_quantize.FORMATS)}, got {state_dtype!r}")


def check_quant_block_size(block_size) -> None:
    """Raise ValueError for a quant_block_size the kernels cannot tile (a power of two that
    divides their smallest tile)."""
    if block_size is not None and (isinstance(block_size, bool)
                                   or block_size not in _quantize.BLOCK_SIZES):
        raise ValueError(f"quant_block_size must be None or one of {list(_quantize.BLOCK_SIZES)}, "
                         f"got {block_size!r}")


def describe(group_index: int, position: int, param: Tensor) -> str:
    """'param 3 of group 0 (shape (37, 51), torch.float32, cuda:0)' for error messages."""
    shard = ""
    if _distributed.is_dtensor(param):
        shard = f", local shard {tuple(param._local_tensor.shape)} of {param.placements}"
    return (f"param {position} of group {group_index} (shape {tuple(param.shape)}{shard}, "
            f"{param.dtype}, {param.device})")


def is_dense(tensor: Tensor) -> bool:
    """True if the tensor's elements fill one run of memory exactly once, in any dim order."""
    if tensor.is_contiguous():
        return True
    return _dense_in_some_order(tensor)


def _dense_in_some_order(tensor: Tensor) -> bool:
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride())
                  if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def overlaps_itself(tensor: Tensor) -> bool:
    """True if two of the tensor's elements may share memory (an expanded or as_strided
    view): each dim, by increasing stride, must step past all the dims before it."""
    reach = 1
    for stride, size in sorted((stride, size) for size, stride in zip(tensor.shape,
                                                                      tensor.stride())
                               if size != 1):
        if stride < reach:
            return True
        reach += (size - 1) * stride
    return False


def memory_span(tensor: Tensor) -> tuple:
    """(first, one past the last) byte address of the tensor's elements (non-negative
    strides, as torch's): its numel's bytes if dense, more for a view with gaps."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr(), tensor.data_ptr() + (last + 1) * tensor.element_size()


def check_param(group_index: int, position: int, param: Tensor) -> None:
    """Refuse params that Adam cannot update in place: not floating point, or elements that
    share memory. Params with gaps between their elements (a strided view) are stepped with
    torch ops where they lie (the kernels update one run of memory)."""
    if not (param.is_floating_point() or param.is_complex()):
        raise TypeError(f"{describe(group_index, position, param)}: Adam needs floating-point "
                        "or complex params")
    _distributed.check_param(describe(group_index, position, param), param)
    memory = _distributed.local(param)
    if memory.numel() > 1 and overlaps_itself(memory):
        # torch's in-place ops refuse it too, at the first step
        raise ValueError(
            f"{describe(group_index, position, param)} with strides {memory.stride()} overlaps "
            "itself in memory (an expanded or as_strided view): some of its elements are one "
            "memory location, which an update cannot write as several; make it a tensor of its "
            "own (e.g. .clone())")


def check_grad(group_index: int, position: int, param: Tensor, grad: Tensor) -> None:
    """Raise if ``grad`` cannot be the gradient of ``param`` (sparse, dtype, shape, device),
    or ``param`` has no memory to step (the meta device, which the optimizer's construction
    accepts, as torch's does)."""
    if param.device.type == "meta":
        raise RuntimeError(
            f"{describe(group_index, position, param)} is on the meta device: it has no memory "
            "for the step to update. Materialise the model first (e.g. "
            "model.to_empty(device=...), which gives it new params, then initialise them) and "
            "build the optimizer on its params (torch's own: `fused=True` requires all the "
            "params to be floating point Tensors of supported devices)")
    if grad.is_sparse:
        raise RuntimeError("Adam does not support sparse gradients, please consider SparseAdam "
                           f"instead ({describe(group_index, position, param)} has a sparse grad)")
    what = describe(group_index, position, param)
    if grad.dtype != param.dtype and not (grad.dtype == torch.float32
                                          and param.dtype in (torch.bfloat16, torch.float16)):
        raise TypeError(f"{what}: grad has dtype {grad.dtype}, expected {param.dtype} (or "
                        "float32 for bfloat16/float16 params)")
    if grad.shape != param.shape:
        raise ValueError(f"{what}: grad has shape {tuple(grad.shape)}, expected "
                         f"{tuple(param.shape)}")
    if grad.device != param.device:
        raise RuntimeError(f"{what}: grad is on {grad.device}, expected {param.device}")


def check_state(group_index: int, position: int, param: Tensor, state: dict, amsgrad: bool,
                precision):
    """Raise if a (possibly loaded) state entry does not fit its param: moments in
    ``precision.state_dtype``, the extra state of its master or compensation (if any) in its
    dtype (a ``_precision.Precision``)."""
    what = describe(group_index, position, param)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    expected = dict.fromkeys(keys, precision.state_dtype)
    shapes = dict.fromkeys(keys, param.shape)
    fmt = precision.format
    if fmt is not None:
        numel = _distributed.local(param).numel()
        for key in keys:
            expected[key] = fmt.signed_dtype if key == "exp_avg" else fmt.unsigned_dtype
            if fmt.packed:
                shapes[key] = torch.Size([_quantize.n_code_elements(numel, fmt)])
            scale = state.get(_quantize.scale_key(key))
            blocks = _quantize.n_blocks(numel, fmt)
            # a plain tensor also for a DTensor param: the scales of this rank's blocks
            if not (isinstance(scale, Tensor) and not _distributed.is_dtensor(scale)
                    and scale.dtype == torch.float32 and tuple(scale.shape) == (blocks,)
                    and scale.device == param.device):
                raise TypeError(f"{what}: state '{_quantize.scale_key(key)}' must be a plain "
                                f"tensor of {blocks} float32 block scales on {param.device}, "
                                f"got {scale!r:.80}")
    if precision.extra_key:
        keys.append(precision.extra_key)
        expected[precision.extra_key] = precision.extra_dtype(param.dtype)
    _check_present(what, state, ["step"] + keys)
    step = state["step"]
    if not isinstance(step, Tensor) or step.numel() != 1:
        raise TypeError(f"{what}: state 'step' must be a 1-element tensor, got {step!r}")
    for key in keys:
        value = state[key]
        _check_like_param(what, key, value, param, shapes.get(key))
        if value.dtype != expected[key]:
            raise TypeError(f"{what}: state '{key}' has dtype {value.dtype}, expected "
                            f"{expected[key]}")


def check_dense_moments(group_index: int, position: int, param: Tensor, state: dict) -> None:
    """Raise if loaded dense moments, about to be quantised into codes of ``param``'s
    blocks (its local shard's for a DTensor), cannot be its moments."""
    what = describe(group_index, position, param)
    _check_present(what, state, ("exp_avg", "exp_avg_sq"))
    for key in ("exp_avg", "exp_avg_sq"):
        value = state[key]
        _check_like_param(what, key, value, param)
        if not value.is_floating_point():
            raise TypeError(f"{what}: state '{key}' has dtype {value.dtype}, expected dense "
                            "floating-point moments (or codes with their scales)")
        _distributed.check_local_layout(what, key, param, value)


def _check_present(what: str, state: dict, keys) -> None:
    for key in keys:
        if key not in state:
            raise KeyError(f"{what}: optimizer state has no '{key}' (was the state_dict saved by "
                           "an optimizer with other settings?)")


def _check_like_param(what: str, key: str, value, param: Tensor, shape=None) -> None:
    """Raise unless the state entry is a tensor of the param's shape (or ``shape``: packed
    codes) on its device."""
    shape = param.shape if shape is None else shape
    if not isinstance(value, Tensor):
        raise TypeError(f"{what}: state '{key}' is {type(value).__name__}, expected a tensor")
    if value.shape != shape:
        raise ValueError(f"{what}: state '{key}' has shape {tuple(value.shape)}, expected "
                         f"{tuple(shape)}")
    if value.device != param.device:
        raise RuntimeError(f"{what}: state '{key}' is on {value.device}, expected "
                           f"{param.device}")


def check_no_overlap(tensors, names) -> None:
    """Raise if two of the tensors share memory: one launch would update it twice, racing."""
    # a strided view's span covers its gaps: views interleaved in one buffer count as sharing
    spans = sorted((*memory_span(t), name) for t, name in zip(tensors, names) if t.numel() > 0)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{name} and {other} share memory: the optimizer would update that "
                             "memory twice; give each parameter its own storage")


def _refcount_in_loop(items, counts):
    # every object is counted from the same bytecode, so the interpreter's own temporary
    # references (which differ between Python versions) are the same for all of them
    for item in items:
        counts.append(sys.getrefcount(item))


def check_reachable(optimizer, grads_by_group) -> None:
    """Raise for a stepped param without a grad that nothing but the optimizer references.

    Such a param was replaced by a new Parameter object (``load_state_dict(assign=True)``,
    FSDP2's ``reset_sharded_param``, model surgery): the model trains the new object, and this
    optimizer would silently never update it again. CPython only (reference counts); params
    with grads are not checked (something produced their grads), nor params without state.
    """
    if not hasattr(sys, "getrefcount"):
        return
    # only params that were stepped before: a param that never had a grad (a scheduler driven
    # without a model, a frozen param) is nothing the optimizer could have trained stale
    stepped = optimizer.state
    candidates = [(gi, pi, p) for gi, (group, grads) in enumerate(zip(optimizer.param_groups,
                                                                      grads_by_group))
                  for pi, (p, g) in enumerate(zip(group["params"], grads))
                  if g is None and stepped.get(p)]
    if not candidates:
        return
    probe = object()
    params = [p for _, _, p in candidates]
    counts = []
    _refcount_in_loop([probe] + params, counts)
    # the probe is held by its local name and the list looped over; each param by that list,
    # ``params`` and its candidate tuple, and by the optimizer: its groups' lists, its state,
    # plans kept for graphs
    baseline = counts[0] - 2
    held = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            held[id(p)] = held.get(id(p), 0) + 1
    for p in optimizer.state:
        held[id(p)] = held.get(id(p), 0) + 1
    plans = {id(plan): plan for plan in getattr(optimizer, "_captured_plans", ())}
    if getattr(optimizer, "_plan", None) is not None:
        plans[id(optimizer._plan)] = optimizer._plan
    for plan in plans.values():
        for p in plan.param_references():
            held[id(p)] = held.get(id(p), 0) + 1
    for (gi, pi, p), count in zip(candidates, counts[1:]):
        if count - baseline - 3 - held.get(id(p), 0) <= 0:
            raise RuntimeError(
                f"{describe(gi, pi, p)} has no grad and is referenced only by this optimizer: "
                "it was replaced by another Parameter object (e.g. by "
                "load_state_dict(assign=True) or FSDP2's reset_sharded_param), which the model "
                "now trains and this optimizer does not hold. Build the optimizer again on "
                "model.parameters() (and load its state_dict) after replacing params")
