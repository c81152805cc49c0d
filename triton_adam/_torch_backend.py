"""The torch fallback: torch's fused Adam kernels, or float32 torch math for the extra options.

Where the Triton kernels cannot run (CPU without the interpreter, float64 params, other devices)
a param group's tensors are stepped here. torch's ``_fused_adam(w)_`` ops (CPU and CUDA, torch >=
2.4) take the default options; the paper formulations, fused clipping and non-finite skipping go
through ``_math_step``, which repeats the Triton kernel's float32 operations in torch ops, so both
backends give the same numbers.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _precision, _quantize, _validation


def _flat(tensor: Tensor) -> Tensor:
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


class TorchBucket:
    """Members of one param group on one device and dtype."""

    def __init__(self, members, group_index, decoupled, maximize, amsgrad):
        self.members = members
        self.group_index = group_index
        self.device = members[0].param.device
        self.index = [(m.group_index, m.position) for m in members]
        self.decoupled, self.amsgrad, self.maximize = decoupled, amsgrad, maximize
        self.params = [m.flat_param for m in members]
        # the local shards of DTensor states: torch's fused ops are pointwise, so stepping the
        # shards gives what torch's DTensor dispatch would, without its per-tensor cost
        self.exp_avgs = [m.flat(m.state["exp_avg"]) for m in members]
        self.exp_avg_sqs = [m.flat(m.state["exp_avg_sq"]) for m in members]
        self.max_exp_avg_sqs = ([m.flat(m.state["max_exp_avg_sq"]) for m in members]
                                if amsgrad else [])
        self.steps = [m.state["step"] for m in members]
        # quantised moments: each member's codes and scales (None: dense moments, as a
        # quantised group's small params have)
        self.codes = [{key: m.flat(m.state[key])
                       for key in _quantize.MOMENT_KEYS + _quantize.SCALE_KEYS if key in m.state}
                      if precision_of(m).quantized else None for m in members]
        # moments held in another dtype than the params: torch's CPU fused kernel refuses that,
        # so these go through the float32 math, the Triton kernel's arithmetic
        self.mixed_state = any(m.state["exp_avg"].dtype != m.param.dtype for m in members)
        # views with gaps between their elements: torch's fused CPU kernel walks a param as
        # one run of memory beside its (dense) moments, and steps them wrong (torch 2.13:
        # 6e-3 off its own foreach=False in 3 steps), so these take the float32 math too
        self.dense = all(_validation.is_dense(p) for p in self.params)
        # the float32 master, remainder or compensation stepped with each param (all members
        # of a bucket keep the same kind, or none), and stochastic rounding's stream keys
        precision = members[0].precision
        self.extra = precision.extra if precision is not None else None
        self.stochastic = precision is not None and precision.stochastic
        self.extras = [m.flat(m.state[m.extra_key]) for m in members] if self.extra else []
        self.rng = [(m.rng_stream, m.rng_offset) for m in members]

    def launch(self, grads, group, grad_scale, found_inf, clip):
        """One step; ``clip`` is a 0-d float32 clip factor or None."""
        grads = [_flat(g) for g in grads]
        default_formulas = (group.get("eps_mode", "torch") == "torch"
                            and group.get("bias_correction", True)
                            and group.get("weight_decay_mode", "torch") == "torch"
                            and not self.mixed_state and not self.extra and self.dense
                            and not self.stochastic
                            and grads[0].dtype == self.params[0].dtype)
        if default_formulas:
            if clip is not None:
                # clip_grad_norm_'s own arithmetic (grads times the clamped factor, in place),
                # then torch's fused step: the numbers of torch's clip + step to the bit. (Folded
                # into grad_scale, a division by 1/clip, they were an ulp apart in some grads,
                # which an element whose second moment is near eps**2 turns into 1e-4.)
                torch._foreach_mul_(grads, clip.to(grads[0].device))
            self._fused_step(grads, group, grad_scale, found_inf)
        else:
            self._math_step(grads, group, grad_scale, found_inf, clip)

    def _fused_step(self, grads, group, grad_scale, found_inf):
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != self.device:
            lr = float(lr)
        torch._foreach_add_(self.steps, 1)
        fused = torch._fused_adamw_ if self.decoupled else torch._fused_adam_
        fused(self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
              self.steps, lr=lr, beta1=float(beta1), beta2=float(beta2),
              weight_decay=float(group["weight_decay"]), eps=float(group["eps"]),
              amsgrad=self.amsgrad, maximize=self.maximize, grad_scale=grad_scale,
              found_inf=found_inf)
        if found_inf is not None:
            # The fused kernel skipped the update; undo the step count as torch does.
            torch._foreach_sub_(self.steps, [found_inf] * len(self.steps))

    def _math_step(self, grads, group, grad_scale, found_inf, clip):
        """The Triton kernels' arithmetic in torch ops, one tensor at a time (float32 math).

        The ops are the ones whose CPU kernels round as the Triton kernel does (lerp, addcmul and
        add-with-alpha fuse their multiply-add; addcdiv does not), so both backends agree.
        """
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, eps, wd = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
        f32 = torch.float32
        as_f32 = lambda x: torch.tensor(x, dtype=f32).item()  # noqa: E731 (torch's rounding)
        taken = 1.0 if found_inf is None else (found_inf == 0).to(f32)
        skip = None if found_inf is None else found_inf != 0
        paper = group.get("eps_mode", "torch") == "paper"
        decay_rate = lr
        if group.get("weight_decay_mode", "torch") == "schedule":
            decay_rate = lr / float(group.get("initial_lr", lr) or 1.0)
        param_scale = as_f32(1 - decay_rate * wd) if self.decoupled else 1.0
        l2 = 0.0 if self.decoupled else wd
        for i, grad in enumerate(grads):
            step = self.steps[i]
            step.add_(taken)
            t = step.to(torch.float64)
            ones = torch.ones_like(t)
            bias_correction = group.get("bias_correction", True)
            bc1 = 1 - beta1 ** t if bias_correction else ones
            bc2_sqrt = (1 - beta2 ** t).sqrt() if bias_correction else ones
            step_size = lr * bc2_sqrt / bc1 if paper else lr / bc1
            if paper:
                bc2_sqrt = ones
            neg_step_size, bc2_sqrt = (-step_size).to(f32), bc2_sqrt.to(f32)

            param, exp_avg, exp_avg_sq = self.params[i], self.exp_avgs[i], self.exp_avg_sqs[i]
            g = grad.to(f32, copy=True)
            if grad_scale is not None:
                g = g / grad_scale
            if clip is not None:
                g = g * clip
            if self.maximize:
                g = g.neg_()
            # the float32 value the extra state keeps (the kernel's rules, see _precision)
            p = _precision.value_of(param, {_precision.EXTRA_KEYS[self.extra]: self.extras[i]}
                                    if self.extra else {})
            p = p.mul_(param_scale)
            if l2 != 0.0:
                g = g.add(p, alpha=l2)
            codes = self.codes[i]
            if codes is not None:
                moments = _quantize.dense(param, codes)
            else:
                moments = {key: t.to(f32, copy=True) for key, t in (
                    ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)) + ((
                        ("max_exp_avg_sq", self.max_exp_avg_sqs[i]),) if self.amsgrad else ())}
            m = moments["exp_avg"].lerp_(g, 1 - beta1)
            v = moments["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            second = torch.maximum(moments["max_exp_avg_sq"], v) if self.amsgrad else v
            if codes is not None:
                values = _quantize.quantized(param, m, v, second if self.amsgrad else None,
                                             _quantize.format_of(codes, param.numel()))
                new = {codes[key]: value for key, value in values.items()}
            else:
                new = {exp_avg: m, exp_avg_sq: v}
                if self.amsgrad:
                    new[self.max_exp_avg_sqs[i]] = second
            # float32 sqrt correctly rounded (torch's vectorised CPU sqrt is not, for ~17% of
            # elements here): in float64 then rounded once, which is exact for square roots
            root = second.double().sqrt_().float()
            if codes is not None:  # the kernel's quantised form: bias correction on step, eps
                denom = root.add_(as_f32(eps) * bc2_sqrt)
                p = p.addcdiv_(m, denom, value=(neg_step_size * bc2_sqrt).item())
            else:
                denom = root.div_(bc2_sqrt).add_(eps)
                p = p.addcdiv_(m, denom, value=neg_step_size.item())
            new.update(self._written_param(i, p, param, group))
            for target, value in new.items():
                if target.dtype == torch.float8_e4m3fn:  # fp8 codes: copied as their bits
                    target, value = target.view(torch.uint8), value.view(torch.uint8)
                if value.dtype != target.dtype:
                    value = _precision.rounded(value, target.dtype)
                if skip is not None:
                    value = torch.where(skip, target, value)
                target.copy_(value)


    def _written_param(self, i, value, param, group) -> dict:
        """What the updated float32 ``value`` writes: {target tensor: its new contents}."""
        if self.extra == "fp32":
            return {self.extras[i]: value, param: _precision.rounded(value, param.dtype)}
        if self.extra == "remainder":
            high, remainder = _precision.split_half_away(value)
            return {self.extras[i]: remainder, param: high}
        if self.extra == "kahan":
            rounded = _precision.rounded(value, param.dtype)
            compensation = value - rounded.float()
            compensation = torch.where(compensation.isfinite(), compensation,
                                       torch.zeros_like(compensation))
            return {self.extras[i]: _precision.rounded(compensation, param.dtype),
                    param: rounded}
        if self.stochastic:
            stream, offset = self.rng[i]
            random16 = _precision.random_bits16(int(group.get("seed") or 0), self.steps[i],
                                                stream, offset, value.numel(), value.device)
            # the stream follows memory order, as the kernel walks it (any dense strides)
            random16 = random16.as_strided(value.shape, value.stride())
            return {param: _precision.stochastic_round(value, random16)}
        return {param: value}


def precision_of(member):
    """A member's Precision (members built outside a plan have none: plain states)."""
    return member.precision or _precision.Precision(member.dtype)


# torch >= 2.5 (and some 2.4 builds) accumulate a foreach norm in a given dtype
_FOREACH_NORM_TAKES_DTYPE = "dtype" in str(torch.ops.aten._foreach_norm.Scalar._schema)


def _float32_norms(tensors, norm_type, device) -> Tensor:
    """Each tensor's ``norm_type``-norm as a float32 ``[len(tensors)]`` tensor on ``device``,
    accumulated in float32 (float64 tensors in float64), as the Triton reduction does.

    A norm in a 16-bit grad's own dtype is rounded to 8 or 11 bits (bfloat16's was ~1e-3 off)
    and overflows float16 past 65504, which a GradScaler's scaled grads reach at an unscaled
    norm of ~1 (an inf norm clipped the update to nothing).
    """
    wide = [t.dtype == torch.float64 for t in tensors]
    narrow = [t for t, w in zip(tensors, wide) if not w]
    if narrow and _FOREACH_NORM_TAKES_DTYPE:
        narrow = torch._foreach_norm(narrow, norm_type, dtype=torch.float32)
    elif narrow:
        narrow = torch._foreach_norm([t.float() for t in narrow], norm_type)
    doubles = [t for t, w in zip(tensors, wide) if w]
    doubles = torch._foreach_norm(doubles, norm_type) if doubles else []
    narrow, doubles = iter(narrow), iter(doubles)
    return torch.stack([(next(doubles) if w else next(narrow)).to(device=device,
                                                                  dtype=torch.float32)
                        for w in wide])


def grad_norm_and_nonfinite(grads, grad_scale, found_inf, device, check_nonfinite=True):
    """Global 2-norm of ``grads`` (unscaled by ``grad_scale``) and a non-finite flag, with torch.

    Both are 0-d float32 tensors on ``device``; the flag also carries ``found_inf``. Without
    ``check_nonfinite`` the grads are not scanned for NaN/inf (one pass fewer) and the flag is
    ``found_inf`` alone.
    """
    flag = torch.zeros((), dtype=torch.float32, device=device)
    if not grads:
        norm = torch.zeros((), dtype=torch.float32, device=device)
    else:
        flat = [_flat(g) for g in grads]
        norm = torch.linalg.vector_norm(_float32_norms(flat, 2.0, device), 2)
        if check_nonfinite:
            flag = torch.stack([(~torch.isfinite(g)).any().to(device) for g in flat]).any()
            flag = flag.to(torch.float32)
    if grad_scale is not None:
        norm = norm / grad_scale.to(device)
    if found_inf is not None:
        flag = torch.maximum(flag, (found_inf.to(device) != 0).to(torch.float32))
    return norm, flag


def segment_totals(grads, segments, n_segments, device, check_nonfinite=True, norm_type=2.0):
    """Per-segment totals of the grads' elements (float32 ``[n_segments]``: sums of |g|**p, max
    |g| for inf) and a non-finite flag (0-d float32), with torch ops, for the cross-rank
    reduction of ``_distributed``. ``segments`` is an int64 device tensor: each grad's
    segment."""
    totals = torch.zeros(n_segments, dtype=torch.float32, device=device)
    flag = torch.zeros((), dtype=torch.float32, device=device)
    if grads:
        flat = [_flat(g) for g in grads]
        norms = _float32_norms(flat, norm_type, device)
        if norm_type == float("inf"):
            totals.scatter_reduce_(0, segments, norms, "amax")
        else:
            totals.index_add_(0, segments, norms.pow(norm_type))
        if check_nonfinite:
            flag = torch.stack([(~torch.isfinite(g)).any().to(device) for g in flat]).any()
            flag = flag.to(torch.float32)
    return totals, flag
