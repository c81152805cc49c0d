"""torch.compile support: inside a compiled graph the whole step is one opaque custom op.

A compiled graph cannot build the step's device tables (``data_ptr()`` of fake tensors), and
Inductor cannot see stores through pointers loaded from a table, so it could not order reads and
writes around the kernels. Under ``torch.compile``, ``step()`` therefore only gathers the params
with grads, their grads and state tensors, and calls ``torch.ops.triton_adam.adam_step``:

* ``mutates_args`` names the params and every state list, so the compiler orders later reads of
  them after the step, and functionalization copies the results back if the op ran on copies;
* its implementation runs when the graph runs, outside the graph: it builds (or reuses) a
  ``StepPlan`` for the tensors it is given and runs it, exactly as an eager step does (the same
  tables, compile-before-launch, one launch per bucket, or the torch fallback);
* it returns nothing (every effect is in place), so its fake implementation does nothing.

Missing state is created by ``init_group`` (the optimizers' ``_init_group``), which dynamo runs
eagerly while tracing, as it does for torch.optim's optimizers: state tensors are real tensors and
inputs of the graph. Hyperparameters are read from the param groups when the op runs; dynamo guards
on the groups' values as it does for torch.optim (a float lr that changes recompiles; use a tensor
lr for schedules, as with torch.optim under torch.compile).
"""
import weakref
from typing import List, Optional

import torch
from torch import Tensor

from . import _precision, _quantize, _validation
from ._state_prep import normalize_steps, prepared_state

# handle (the optimizer's id) -> weak reference: the op's arguments can only be tensors and
# plain values, so the graph names its optimizer by this integer
_OPTIMIZERS: dict = {}
# optimizer -> (key, StepPlan) of the last op call whose tensors were the optimizer's own
_PLANS = weakref.WeakKeyDictionary()


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def _optimizer(handle: int):
    """The live optimizer a handle names, or None."""
    ref = _OPTIMIZERS.get(handle)
    return ref() if ref is not None else None


def _forget(handle: int):
    """A weakref callback dropping ``handle`` when its optimizer dies (unless already reused)."""
    def callback(ref):
        if _OPTIMIZERS.get(handle) is ref:
            del _OPTIMIZERS[handle]
    return callback


def init_group(optimizer, group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
               extras=None, scales=None, scale_keys=None):
    """Check every param and grad, create missing state, and list ``group``'s step tensors.

    Runs eagerly while dynamo traces ``step()`` (dynamo calls an optimizer's ``_init_group``
    itself, as for torch.optim's), so it may read data pointers and create tensors. Appends, for
    each param of ``group`` with a grad: the param, its grad and its state tensors
    (``max_exp_avg_sqs`` only with amsgrad; ``extras``, if given, the float32 master, master
    remainder or Kahan compensation of the params that keep one; ``scales`` and
    ``scale_keys``, if given, the block scales of quantised moments, whose codes are in the
    moment lists, and which ones each param has, see ``adam_step``). Nothing is created if any
    check fails. (dynamo hands back only the lists passed by position: pass them so.)
    """
    handle = id(optimizer)
    if _optimizer(handle) is not optimizer:
        _OPTIMIZERS[handle] = weakref.ref(optimizer, _forget(handle))
    optimizer._compile_handle = handle
    # Every group's state is created at the first group's call: dynamo guards on the state's
    # size after each call, and guards taken while it still grows would fail at the next step.
    for group_index, each in enumerate(optimizer.param_groups):
        for position, param in enumerate(each["params"]):
            if _is_dtensor(param):
                raise NotImplementedError(
                    "triton-adam: torch.compile of step() with DTensor (FSDP2) params is not "
                    "supported; call opt.step() outside the compiled function (or wrap it in "
                    "torch.compiler.disable)")
            _validation.check_param(group_index, position, param)
            if param.grad is not None:
                _validation.check_grad(group_index, position, param, param.grad)
                _precision.of(each, param, _validation.describe(group_index, position, param))
    normalize_steps(optimizer)
    _init_states(optimizer)
    _ensure_result_buffers(optimizer)
    for param in group["params"]:
        if param.grad is None:
            continue
        state = optimizer.state[param]
        params.append(param)
        grads.append(param.grad)
        exp_avgs.append(state["exp_avg"])
        exp_avg_sqs.append(state["exp_avg_sq"])
        steps.append(state["step"])
        if group["amsgrad"]:
            max_exp_avg_sqs.append(state["max_exp_avg_sq"])
        extra_key = _precision.of(group, param).extra_key
        if extra_key is not None and extras is not None:
            extras.append(state[extra_key])
        if scale_keys is not None:
            held = _quantize.scale_keys(state)
            scales += [state[key] for key in held]
            scale_keys.append(sum(1 << _quantize.SCALE_KEYS.index(key) for key in held))
    return False


def _init_states(optimizer) -> None:
    """Create or convert every stepped param's state as an eager step does (see
    ``optimizer.prepared_state``: 8-bit codes, a loaded checkpoint in this storage, ...), in
    the layout the kernels use; stored only once every param's is ready."""
    from ._plan import Member, _check_state_layout

    prepared = []
    for group_index, group in enumerate(optimizer.param_groups):
        for position, param in enumerate(group["params"]):
            if param.grad is not None:
                state = optimizer.state.get(param)
                prepared.append((group_index, position, param, group, state,
                                 *prepared_state(group_index, position, param, group, state)))
    for group_index, position, param, group, state, new, rewrite in prepared:
        if new is not state:
            optimizer.state[param] = new
        if rewrite is not None:
            param.detach().copy_(rewrite)
        # the kernels index states with the param's strides: a loaded state gets them here,
        # where the optimizer's own state can be replaced (a value-preserving copy; 8-bit
        # codes are re-quantised), as the plan does in an eager step
        member = Member.of(group_index, position, param, new)
        member.precision = _precision.of(group, param)
        _check_state_layout(member, bool(group["amsgrad"]))


def _ensure_result_buffers(optimizer) -> None:
    """With clipping or skipping, make ``last_grad_norm`` / ``last_step_skipped`` 0-d tensors the
    compiled step updates in place.

    dynamo drops attribute assignments on optimizers inside a compiled step, so the step cannot
    hand over fresh result tensors as an eager step does; the op writes into these instead.
    """
    if optimizer.max_grad_norm is None and not optimizer.skip_nonfinite:
        return
    device = next((p.device for g in optimizer.param_groups for p in g["params"]
                   if p.grad is not None), torch.device("cpu"))
    for name, dtype in (("last_grad_norm", torch.float32), ("last_step_skipped", torch.bool)):
        value = getattr(optimizer, name, None)
        if not (isinstance(value, Tensor) and value.dim() == 0 and value.dtype == dtype
                and value.device == device):
            setattr(optimizer, name, torch.zeros((), dtype=dtype, device=device))


def compiled_step(optimizer, closure=None):
    """``step()`` as traced by dynamo: one call of the ``triton_adam::adam_step`` op."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = [], [], [], [], [], []
    extras, scales, scale_keys = [], [], []
    groups, indices = [], []
    group_index = first_index = 0
    for group in optimizer.param_groups:
        before = len(params)
        optimizer._init_group(group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                              steps, extras, scales, scale_keys)
        groups += [group_index] * (len(params) - before)
        # each stepped param's index in the optimizer: stochastic rounding's stream key
        indices += [first_index + i for i, p in enumerate(group["params"]) if p.grad is not None]
        group_index += 1
        first_index += len(group["params"])
    results = []
    if optimizer.max_grad_norm is not None or optimizer.skip_nonfinite:
        results = [optimizer.last_grad_norm, optimizer.last_step_skipped]
    torch.ops.triton_adam.adam_step(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, extras, scales, results,
        getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None), groups,
        indices, scale_keys, optimizer._compile_handle)
    return loss


class _StepView:
    """What ``StepPlan`` reads of an optimizer, over the tensors the op was given.

    Under functionalization (e.g. ``aot_eager``) those are copies of the params and states, so
    the plan must address them, not the optimizer's own; hyperparameters and options are the
    optimizer's, read now.
    """

    def __init__(self, optimizer, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                 extras, scales, groups, indices, scale_keys):
        self.backend = optimizer.backend
        self.max_grad_norm = optimizer.max_grad_norm
        self.skip_nonfinite = optimizer.skip_nonfinite
        self.last_grad_norm = None
        self.last_step_skipped = None
        self.param_groups = [dict(group, params=[]) for group in optimizer.param_groups]
        self.grads_by_group = [[] for _ in optimizer.param_groups]
        self.state = {}
        self.param_index = {}  # each param's index in the optimizer (see StepPlan)
        max_exp_avg_sqs = iter(max_exp_avg_sqs)
        extras = iter(extras)
        scales = iter(scales)
        for i, gi in enumerate(groups):
            param = params[i]
            self.param_groups[gi]["params"].append(param)
            self.grads_by_group[gi].append(grads[i])
            state = {"step": steps[i], "exp_avg": exp_avgs[i], "exp_avg_sq": exp_avg_sqs[i]}
            if self.param_groups[gi]["amsgrad"]:
                state["max_exp_avg_sq"] = next(max_exp_avg_sqs)
            extra_key = _precision.of(self.param_groups[gi], param).extra_key
            if extra_key is not None:
                state[extra_key] = next(extras)
            for bit, key in enumerate(_quantize.SCALE_KEYS):
                if scale_keys[i] >> bit & 1:
                    state[key] = next(scales)
            self.state[param] = state
            self.param_index[param] = indices[i]


def _owns(optimizer, view) -> bool:
    """True when the op was given the optimizer's own params and state tensors (no copies)."""
    for param, state in view.state.items():
        own = optimizer.state.get(param)
        if own is None or any(own.get(key) is not value for key, value in state.items()):
            return False
    return True


def _plan_for(optimizer, view):
    from ._plan import StepPlan

    states = view.state
    key = (optimizer._layout_version, optimizer.backend,
           tuple((gi, tuple((p.data_ptr(),) + tuple(t.data_ptr() for t in states[p].values())
                            for p in group["params"]), bool(group["amsgrad"]),
                  bool(group["maximize"]), bool(group.get("decoupled_weight_decay", False)),
                  group.get("state_dtype"), group.get("master_weights", False),
                  bool(group.get("kahan_summation")), bool(group.get("stochastic_rounding")),
                  # the launch specialises on the grads' dtypes (float32 grads of 16-bit params)
                  tuple(None if g is None else g.dtype for g in view.grads_by_group[gi]))
                 for gi, group in enumerate(view.param_groups)))
    cached = _PLANS.get(optimizer)
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = StepPlan(view, view.grads_by_group, states, key)
    if _owns(optimizer, view):
        # copies (functionalization) are new tensors at every call: a plan over them would only
        # keep them alive
        _PLANS[optimizer] = (key, plan)
    else:
        _PLANS.pop(optimizer, None)
    return plan


@torch.library.custom_op(
    "triton_adam::adam_step",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps", "extras",
                  "scales", "results"))
def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
              exp_avg_sqs: List[Tensor], max_exp_avg_sqs: List[Tensor], steps: List[Tensor],
              extras: List[Tensor], scales: List[Tensor], results: List[Tensor],
              grad_scale: Optional[Tensor], found_inf: Optional[Tensor], groups: List[int],
              indices: List[int], scale_keys: List[int], handle: int) -> None:
    """One Adam/AdamW step of the optimizer ``handle`` names, on the given tensors, in place.

    ``groups[i]`` is the param group of ``params[i]`` and ``indices[i]`` its index in the
    optimizer (all groups' params in order); ``max_exp_avg_sqs`` lists the states of
    the amsgrad groups' params, in order, and ``extras`` the masters, master remainders or
    Kahan compensations of the params that keep one. Quantised moments travel as their codes
    (whatever their dtype) in the moment lists and their block scales in ``scales``: bit ``k``
    of ``scale_keys[i]`` says that ``params[i]`` has ``_quantize.SCALE_KEYS[k]`` there (param
    by param, keys in that order). With clipping or skipping, ``results`` holds two 0-d tensors
    that receive the global grad norm and whether the step was skipped.
    """
    optimizer = _optimizer(handle)
    if optimizer is None:
        raise RuntimeError("triton-adam: the optimizer of this compiled step no longer exists")
    view = _StepView(optimizer, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                     extras, scales, groups, indices, scale_keys)
    plan = _plan_for(optimizer, view)
    plan.run(view, view.grads_by_group, grad_scale, found_inf)
    if results:
        results[0].copy_(view.last_grad_norm)
        results[1].copy_(view.last_step_skipped)


@adam_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, extras, scales, results,
      grad_scale, found_inf, groups, indices, scale_keys, handle):
    """Every effect is an in-place update of an argument: nothing to compute for shapes."""
