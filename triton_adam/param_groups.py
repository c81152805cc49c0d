"""Param-group helpers from the AdamW paper and keras-adamw: which params decay, lr multipliers."""
from __future__ import annotations

import math
import re

import torch

DEFAULT_NO_DECAY = (r"(^|\.)bias$", r"norm", r"(^|\.)ln_?\w*\.", r"embedding")


def normalized_weight_decay(wd_norm: float, batch_size: int, total_samples: int) -> float:
    """The AdamW paper's normalised weight decay: ``wd_norm * sqrt(batch_size / total_samples)``.

    Args:
        wd_norm: the normalised decay lambda_norm (the paper's good values are about 0.025-0.05).
        batch_size: b, samples per step.
        total_samples: B*T, the samples seen in the whole run (training points times epochs).
            To give the run's length in optimizer steps instead, pass
            ``steps * batch_size``.

    Returns:
        lambda = lambda_norm * sqrt(b / (B*T)), to use as ``weight_decay``. (This is the paper's
        decay per step in its own parametrisation; with torch's decay ``p *= 1 - lr * wd``
        divide it by the base lr, or use ``weight_decay_mode="schedule"``.)
    """
    if batch_size <= 0 or total_samples <= 0:
        raise ValueError(f"batch_size and total_samples must be positive, got {batch_size}, "
                         f"{total_samples}")
    return wd_norm * math.sqrt(batch_size / total_samples)


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None,
                 no_decay=DEFAULT_NO_DECAY, lr_multipliers: dict | None = None) -> list[dict]:
    """Split ``model``'s trainable params into ordinary torch param groups.

    Args:
        model: the module whose ``named_parameters()`` are grouped.
        weight_decay: decay for the params that decay.
        lr: the base lr; needed only with ``lr_multipliers`` (each group's ``lr`` is
            ``lr * multiplier``, so lr schedulers, which scale each group from its own initial
            lr, compose with it and nothing is applied twice).
        no_decay: regular expressions (searched in the parameter name) for params that do not
            decay; 1-d params (biases, norm scales) never decay either, as is customary.
        lr_multipliers: ``{pattern: multiplier}``, keras-adamw style; the first pattern that
            matches a name wins, unmatched params get 1.

    Returns:
        A list of dicts with ``params``, ``weight_decay`` and (with multipliers) ``lr`` and
        ``lr_multiplier``, one per (decay, multiplier) combination that occurs, in the order
        first seen; each carries ``param_names`` for inspection.
    """
    lr_multipliers = lr_multipliers or {}
    if lr_multipliers and lr is None:
        raise ValueError("lr_multipliers need the base lr")
    patterns = [re.compile(p) for p in no_decay]
    multiplier_patterns = [(re.compile(p), float(m)) for p, m in lr_multipliers.items()]
    groups: dict = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.dim() > 1 and not any(p.search(name) for p in patterns)
        multiplier = next((m for p, m in multiplier_patterns if p.search(name)), 1.0)
        key = (decays, multiplier)
        if key not in groups:
            group = {"params": [], "param_names": [],
                     "weight_decay": weight_decay if decays else 0.0}
            if lr_multipliers:
                group["lr"] = lr * multiplier
                group["lr_multiplier"] = multiplier
            groups[key] = group
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())
