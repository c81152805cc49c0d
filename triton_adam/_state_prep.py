"""A param's optimizer state as a step holds it: created, or a loaded one adopted and converted.

Shared by the eager step (``optimizer._build_plan``) and the compiled one (``_compile.init_group``,
which dynamo runs while tracing): both prepare states through ``prepared_state`` and make step
counts what the kernels read through ``normalize_steps``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _distributed, _precision, _quantize, _validation
from ._plan import state_key_names


def normalize_steps(optimizer) -> None:
    """Make every ``step`` a 0-d float32 tensor on its param's device, as the kernels read it.

    torch keeps ``step`` on the CPU unless fused or capturable, and old checkpoints hold plain
    numbers; the value is kept exactly.
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state or "step" not in state:
                continue
            step = state["step"]
            if not isinstance(step, Tensor):
                # stored even where its dtype, device and shape already fit (a CPU param)
                step = state["step"] = torch.tensor(float(step), dtype=torch.float32)
            if _distributed.is_dtensor(step):
                # a step that went through distribute_tensor (a resharded checkpoint):
                # the kernels read it by address, and a DTensor has none
                step = step.full_tensor()
                state["step"] = step
            if step.dtype != torch.float32 or step.device != param.device or step.dim():
                state["step"] = step.detach().to(dtype=torch.float32,
                                                 device=param.device).reshape(())


def _initial_state(param: Tensor, amsgrad: bool, precision) -> dict:
    """Zero moments in ``precision.state_dtype``, a 0-d float32 step and the param's extra
    state (a float32 master, its remainder or a zero compensation; see _precision)."""
    # step is a plain 0-d tensor also for DTensor params, as torch keeps it
    state = {"step": torch.zeros((), dtype=torch.float32, device=param.device)}
    if precision.quantized:
        state.update(_quantize.zero_state(param, precision.format, amsgrad))
    for key in state_key_names(amsgrad):
        if key not in state:
            state[key] = _distributed.zeros_like(param, precision.state_dtype)
    state, _ = _precision.convert(param, state, precision)
    return state


def _zero_max(param: Tensor, precision) -> dict:
    """amsgrad's maximum of zero (its codes and scale when quantised)."""
    if precision.quantized:
        zero = _quantize.zero_state(param, precision.format, amsgrad=True)
        return {key: zero[key] for key in ("max_exp_avg_sq", "max_exp_avg_sq_scale")}
    return {"max_exp_avg_sq": _distributed.zeros_like(param, precision.state_dtype)}


def prepared_state(group_index: int, position: int, param: Tensor, group: dict, state):
    """``param``'s state as a step of ``group`` holds it: created if missing; a loaded one
    adopted, its moments quantised or decoded and its extra state converted to the group's
    storage; amsgrad's maximum added. Returns (``state`` itself, or a new dict: nothing is
    stored here; bits to write into the param, or None). An eager step and a compiled one
    (``_compile.init_group``) prepare states alike through this.
    """
    what = _validation.describe(group_index, position, param)
    precision = _precision.of(group, param, what)
    if not state:
        state = _initial_state(param, group["amsgrad"], precision)
    state = _adopt_loaded_state(group_index, position, param, state, precision)
    # dense moments (a checkpoint, or codes switched on) into codes, or codes (a compact
    # checkpoint, or another storage) back to dense ones
    if precision.quantized and not _quantize.is_quantized(state):
        _validation.check_dense_moments(group_index, position, param, state)
    try:
        state = _quantize.convert(param, state, precision.format, precision.dense_dtype)
        state = _quantize.relaid(param, state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise ValueError(f"{what}: its loaded moments cannot be converted to its storage "
                         f"(a state dict saved for another param?): {error}") from error
    # a torch checkpoint, another mode's checkpoint, or a mode switched: the float32 value
    # carried into this mode's form (see _precision.convert)
    state, rewrite = _precision.convert(param, state, precision)
    if group["amsgrad"] and "max_exp_avg_sq" not in state:
        # amsgrad switched on mid-training: start its maximum from zero.
        state = dict(state, **_zero_max(param, precision))
    return state, rewrite


def _adopt_loaded_state(group_index: int, position: int, param: Tensor, state: dict,
                        precision) -> dict:
    """The state with its tensors in the form kept for ``param``: DTensor states for DTensor
    params, moments in ``precision.state_dtype`` (torch's load_state_dict casts them to the
    param's dtype; a torch checkpoint's float32 moments are rounded once here). The same dict
    when nothing changes, else a new one (stored once the plan is built).
    """
    what = _validation.describe(group_index, position, param)
    dtypes = {} if precision.quantized else dict.fromkeys(
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), precision.state_dtype)
    if precision.extra_key:
        dtypes[precision.extra_key] = precision.extra_dtype(param.dtype)

    # 8-bit codes and their scales describe this rank's blocks together: redistributed codes
    # would no longer match their scales (the plan's checks refuse ones that do not fit)
    as_held = ("step",) + (_quantize.MOMENT_KEYS + _quantize.SCALE_KEYS
                           if _quantize.is_quantized(state) else ())

    def adopt(key, value):
        if key in as_held or not isinstance(value, Tensor):
            return value
        value = _distributed.adopt_state(what, key, param, value)
        dtype = dtypes.get(key, value.dtype)
        if value.dtype != dtype and value.is_floating_point() and dtype.is_floating_point:
            value = value.to(dtype)
        return value

    adopted = {key: adopt(key, value) for key, value in state.items()}
    if all(adopted[key] is state[key] for key in state):
        return state
    return adopted
