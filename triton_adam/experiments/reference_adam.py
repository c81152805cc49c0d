"""A plain tensor-op Adam used where triton_adam lacks a variant an experiment needs.

This is a *reference* for the experiments, not part of the optimizer package:
it is written for clarity (one tensor at a time, no fusion) and only exists so
that the bias-correction and decoupling experiments can run even when the
installed ``triton_adam`` does not offer ``bias_correction=False`` or
``weight_decay_mode="schedule"``. The report says which implementation made
each curve. With ``bias_correction=True`` and ``weight_decay_mode="l2"`` it
follows ``torch.optim.Adam`` operation for operation; with
``weight_decay_mode="decoupled"`` it follows ``torch.optim.AdamW``.
"""
from __future__ import annotations

import math

import torch

WEIGHT_DECAY_MODES = ("l2", "decoupled", "schedule")


class ReferenceAdam(torch.optim.Optimizer):
    """Adam with switchable bias correction and weight-decay form.

    weight_decay_mode:
      * ``"l2"``: add ``weight_decay * p`` to the gradient (Adam with L2, as
        ``torch.optim.Adam``);
      * ``"decoupled"``: ``p *= 1 - lr * weight_decay`` (``torch.optim.AdamW``'s
        form, which ties the decay to the learning rate);
      * ``"schedule"``: ``p *= 1 - eta_t * weight_decay`` with ``eta_t`` the
        schedule multiplier ``lr / initial_lr`` (Loshchilov & Hutter's
        Algorithm 2, where the decay follows the schedule but not ``lr``).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bias_correction: bool = True,
                 weight_decay_mode: str = "l2"):
        if weight_decay_mode not in WEIGHT_DECAY_MODES:
            raise ValueError(f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {weight_decay_mode!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, weight_decay_mode=weight_decay_mode)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            wd, mode = group["weight_decay"], group["weight_decay_mode"]
            # LR schedulers record the starting lr as "initial_lr"; without a
            # scheduler the multiplier is 1 by definition.
            eta = lr / group["initial_lr"] if group.get("initial_lr") else 1.0
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                if wd != 0:
                    if mode == "l2":
                        grad = grad.add(p, alpha=wd)
                    elif mode == "decoupled":
                        p.mul_(1 - lr * wd)
                    else:
                        p.mul_(1 - eta * wd)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["bias_correction"]:
                    # Same association of operations as torch.optim.Adam so
                    # the two agree to float rounding, not just in exact math.
                    step_size = lr / (1 - beta1 ** t)
                    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
                else:
                    step_size = lr
                    denom = v.sqrt().add_(eps)
                p.addcdiv_(m, denom, value=-step_size)
        return loss
