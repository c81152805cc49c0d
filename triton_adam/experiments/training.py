"""The one training loop every experiment shares, and evaluation."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .data import Digits, minibatches


@dataclass
class History:
    """What a run produced: per-step and per-epoch training loss."""

    step_loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    diverged: bool = False

    @property
    def final_epoch_loss(self) -> float:
        return self.epoch_loss[-1] if self.epoch_loss else math.nan


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: Digits, *, epochs: int,
          batch_size: Optional[int] = None, seed: int = 0,
          scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
          scheduler_per: str = "step", max_steps: Optional[int] = None,
          on_step: Optional[Callable[[], None]] = None) -> History:
    """Train ``model`` with cross-entropy; ``batch_size=None`` means full batch.

    The minibatch order comes from its own generator seeded with ``seed``, so
    runs that differ only in the optimizer see the same batches. A run whose
    loss becomes non-finite stops early and is marked ``diverged`` (its
    remaining epochs are recorded as NaN) rather than wasting time.
    """
    gen = torch.Generator().manual_seed(seed)
    n = data.x_train.shape[0]
    bs = n if batch_size is None else batch_size
    hist = History()
    steps = 0
    model.train()
    for _ in range(epochs):
        total, count = 0.0, 0
        for idx in minibatches(n, bs, gen):
            idx = idx.to(data.x_train.device)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            if scheduler is not None and scheduler_per == "step":
                scheduler.step()
            value = loss.item()
            hist.step_loss.append(value)
            total += value * len(idx)
            count += len(idx)
            steps += 1
            if on_step is not None:
                on_step()
            if not math.isfinite(value):
                hist.diverged = True
                break
            if max_steps is not None and steps >= max_steps:
                break
        hist.epoch_loss.append(total / count if not hist.diverged else math.nan)
        if scheduler is not None and scheduler_per == "epoch":
            scheduler.step()
        if hist.diverged or (max_steps is not None and steps >= max_steps):
            break
    hist.epoch_loss += [math.nan] * (epochs - len(hist.epoch_loss)) if hist.diverged else []
    return hist


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Return (mean cross-entropy, classification error in [0, 1]) in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    err = (logits.argmax(dim=1) != y).float().mean().item()
    model.train(was_training)
    return loss, err
