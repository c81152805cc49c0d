"""Param groups with ``differentiable=True``: torch's own single-tensor Adam, with autograd
recording through the step, as ``torch.optim.Adam(differentiable=True)`` does.

Such a step is for meta-learning and hyperparameter gradients (the update a function of the
params, grads, states and tensor hyperparameters), not for speed, and the fused kernels update
in place outside autograd; so these groups run ``torch.optim.adam.adam`` (its single-tensor
path) outside the plan, on this optimizer's state under torch's keys. The other groups of the
same optimizer still go through the plan, which sees no params in these groups.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam as torch_adam

from . import _quantize

# Options of ours that change what the step computes or how the state is held; torch's
# differentiable implementation has none of them, so they must stay at these defaults.
_PLAIN = (("eps_mode", "torch"), ("bias_correction", True), ("weight_decay_mode", "torch"),
          ("state_dtype", None), ("master_weights", False), ("kahan_summation", False),
          ("stochastic_rounding", False))


def any_group(optimizer) -> bool:
    """Whether any param group of ``optimizer`` has ``differentiable=True``."""
    return any(group.get("differentiable", False) for group in optimizer.param_groups)


def check_group(optimizer, group: dict, group_index: int) -> None:
    """Raise if ``group`` (its options merged with the defaults) asks for a differentiable
    step with something torch's differentiable Adam cannot do; nothing for other groups."""
    if not group.get("differentiable", False):
        return
    if group.get("fused"):
        raise RuntimeError("`fused` does not support `differentiable`")
    for key, default in _PLAIN:
        if group.get(key, default) != default:
            raise ValueError(
                f"param group {group_index}: differentiable=True runs torch's own "
                f"differentiable Adam, which has no {key}={group[key]!r}; leave {key} at "
                f"{default!r} in differentiable groups")
    for key in ("max_grad_norm", "skip_nonfinite"):
        if getattr(optimizer, key, None):
            raise ValueError(
                f"{key}={getattr(optimizer, key)!r} cannot be combined with differentiable=True "
                f"(param group {group_index}): the fused clip and skip act on the whole "
                "optimizer outside autograd")


def _new_state(param: Tensor, amsgrad: bool) -> dict:
    # torch's, but with the step on the param's device as this package keeps it
    state = {"step": torch.zeros((), dtype=torch.float32, device=param.device),
             "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
             "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
    if amsgrad:
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def _usable_state(param: Tensor, state: dict, amsgrad: bool) -> dict:
    """``state`` as the differentiable step reads it: created if empty, quantised moments (a
    compact checkpoint) decoded into the param's dtype, amsgrad's maximum added from zero."""
    if not state:
        return _new_state(param, amsgrad)
    if _quantize.is_quantized(state):
        state = _quantize.convert(param.detach(), state, quantize=False, dtype=param.dtype)
    if amsgrad and "max_exp_avg_sq" not in state:
        state = dict(state, max_exp_avg_sq=torch.zeros_like(
            param, memory_format=torch.preserve_format))
    return state


class DifferentiableStep:
    """The differentiable groups of one ``step()``: checked and gathered first (nothing is
    modified if anything is refused), run after the fused groups with ``run()``."""

    def __init__(self, optimizer, grads_by_group, grad_scale, found_inf):
        self.optimizer = optimizer
        self.calls = []
        self.new_states = {}
        groups = optimizer.param_groups
        self.covers_all = all(group.get("differentiable", False) for group in groups)
        if not self.covers_all and torch.compiler.is_compiling():
            raise NotImplementedError(
                "triton-adam: torch.compile of step() with both differentiable=True and other "
                "param groups is not supported; use two optimizers, or step outside the "
                "compiled function")
        # under a GradScaler the fused groups unscale in their kernels; here the grads are
        # unscaled as GradScaler.unscale_ would (times the float32 reciprocal), and a step
        # with an inf or NaN grad anywhere is skipped (found_inf read on the host: this path
        # is not for speed)
        self.skipped = found_inf is not None and bool(found_inf.item())
        inverse = None if grad_scale is None else grad_scale.double().reciprocal().float()
        for gi, (group, grads) in enumerate(zip(groups, grads_by_group)):
            if not group.get("differentiable", False):
                continue
            check_group(optimizer, group, gi)
            self.calls.append(self._gather(gi, group, grads, inverse))

    def _gather(self, group_index: int, group: dict, grads, inverse):
        amsgrad = bool(group["amsgrad"])
        lists = {"params": [], "grads": [], "exp_avgs": [], "exp_avg_sqs": [],
                 "max_exp_avg_sqs": [], "state_steps": []}
        for param, grad in zip(group["params"], grads):
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("Adam does not support sparse gradients, please consider "
                                   f"SparseAdam instead (a param of group {group_index})")
            held = self.optimizer.state.get(param)
            state = _usable_state(param, held, amsgrad)
            if state is not held:
                self.new_states[param] = state
            if torch.is_tensor(state["step"]) and state["step"].requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode")
            lists["params"].append(param)
            lists["grads"].append(grad if inverse is None else grad * inverse.to(grad.device))
            lists["exp_avgs"].append(state["exp_avg"])
            lists["exp_avg_sqs"].append(state["exp_avg_sq"])
            if amsgrad:
                lists["max_exp_avg_sqs"].append(state["max_exp_avg_sq"])
            lists["state_steps"].append(state["step"])
        beta1, beta2 = group["betas"]
        options = dict(
            amsgrad=amsgrad, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=bool(group["maximize"]), foreach=False, fused=False,
            # the differentiable path's math is the capturable one; capturable=True would only
            # add torch's device check, which refuses CPU params
            capturable=False, differentiable=True,
            has_complex=any(torch.is_complex(p) for p in lists["params"]),
            decoupled_weight_decay=bool(group.get("decoupled_weight_decay", False)))
        return lists, options

    def run(self) -> None:
        """Store new states and step every differentiable group, autograd recording."""
        for param, state in self.new_states.items():
            self.optimizer.state[param] = state
        if self.skipped:
            return
        with torch.enable_grad():
            for lists, options in self.calls:
                if lists["params"]:
                    torch_adam(lists["params"], lists["grads"], lists["exp_avgs"],
                               lists["exp_avg_sqs"], lists["max_exp_avg_sqs"],
                               lists["state_steps"], **options)


def grads_for_plan(optimizer, grads_by_group) -> list:
    """``grads_by_group`` with every differentiable group's list empty: the plan then sees no
    params there (none to check, to hold state for, or to step)."""
    return [[] if group.get("differentiable", False) else grads
            for group, grads in zip(optimizer.param_groups, grads_by_group)]
