"""The digits data set (scikit-learn's ``load_digits``) as torch tensors.

``load_digits`` ships inside the scikit-learn wheel, so the experiments need
no download and run the same on a machine without network access.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch


@dataclass
class Digits:
    """A train/test split of the 8x8 digits, standardised with train statistics."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def n_classes(self) -> int:
        return 10

    def to(self, device) -> "Digits":
        """Return a copy with every tensor on ``device``."""
        return Digits(*(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)))


def load(seed: int = 0, test_fraction: float = 0.2, train_size: Optional[int] = None) -> Digits:
    """Load digits, split stratified with ``seed``, optionally subsample the train part.

    ``train_size`` keeps only that many training examples (stratified too), which
    is how the decoupling experiment makes regularisation matter; the test split
    stays the same size so test errors stay comparable.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    if train_size is not None and train_size < len(y_tr):
        x_tr, _, y_tr, _ = train_test_split(x_tr, y_tr, train_size=train_size, random_state=seed, stratify=y_tr)
    # Standardise with train statistics only; the constant-zero border pixels
    # get a unit scale so they stay zero instead of dividing by zero.
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)
    as_y = lambda a: torch.tensor(a, dtype=torch.long)
    return Digits(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


def minibatches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Yield index tensors of one shuffled epoch; the last batch may be short."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]
