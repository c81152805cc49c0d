"""The small models the experiments train: logistic regression and MLPs."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def logistic_regression(n_features: int = 64, n_classes: int = 10, seed: int = 0) -> nn.Module:
    """Multinomial logistic regression (one linear layer; softmax lives in the loss)."""
    torch.manual_seed(seed)
    return nn.Linear(n_features, n_classes)


def mlp(hidden: Sequence[int], n_features: int = 64, n_classes: int = 10, dropout: float = 0.0,
        seed: int = 0) -> nn.Module:
    """ReLU MLP with the given hidden widths, with dropout after each hidden layer if asked.

    The seed is applied right before construction so two calls with the same
    arguments give bit-identical initial weights, whichever optimizer follows.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def n_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
