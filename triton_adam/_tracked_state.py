"""State dicts that count their own changes, so a steady step checks them in O(1).

The step's device tables hold the addresses of every state tensor. A state dict changed from
outside (``opt.state[p]["exp_avg"] = t.to(device)``, an offload loop, ``opt.state[p] = {...}``)
must rebuild the tables before the next launch, or the kernels would update tensors nobody reads.
Comparing every member's dict and state tensors by identity at every step costs a few hundred
nanoseconds per tensor; instead, the optimizer's state table and the state dicts it holds are
``TrackedState`` dicts whose every mutation bumps one process-wide counter, ``EPOCH``. A step whose
plan saw the same ``EPOCH`` knows nothing was stored, deleted or replaced in any of them.

They are plain dicts to everything else (``isinstance(s, dict)``; reads are dict's own), and
pickle as plain dicts (``torch.save`` of a state dict, ``torch.load(weights_only=True)``). The
counter is process-wide rather than per optimizer so that pickling carries nothing of ours: a
change in one optimizer's states costs another one slow (fully checked, then re-cached) step.
"""
from __future__ import annotations

from collections import defaultdict

# bumped by every mutation of any TrackedState or TrackedStateTable
EPOCH = [0]


def _bump() -> None:
    EPOCH[0] += 1


class _CountsChanges:
    """Every mutating dict method bumps ``EPOCH``, then does what dict does."""

    __slots__ = ()

    def __setitem__(self, key, value):
        _bump()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        _bump()
        dict.__delitem__(self, key)

    def __ior__(self, other):
        _bump()
        dict.update(self, other)
        return self

    def update(self, *args, **kwargs):
        _bump()
        dict.update(self, *args, **kwargs)

    def setdefault(self, key, default=None):
        _bump()
        return dict.setdefault(self, key, default)

    def pop(self, *args):
        _bump()
        return dict.pop(self, *args)

    def popitem(self):
        _bump()
        return dict.popitem(self)

    def clear(self):
        _bump()
        dict.clear(self)


class TrackedState(_CountsChanges, dict):
    """A param's state dict (``opt.state[p]``) that bumps ``EPOCH`` whenever it changes."""

    __slots__ = ()

    def __reduce__(self):
        return dict, (dict(self),)


class TrackedStateTable(_CountsChanges, defaultdict):
    """``optimizer.state``: a ``defaultdict`` of ``TrackedState`` that bumps ``EPOCH`` when an
    entry is added, replaced or removed."""

    __slots__ = ()

    def __init__(self, items=()):
        super().__init__(TrackedState)
        for key, value in dict(items).items():
            dict.__setitem__(self, key, tracked(value))

    def __reduce__(self):
        # torch's own optimizers hold a defaultdict(dict): so does a pickled one of ours
        return defaultdict, (dict, {k: dict(v) if isinstance(v, dict) else v
                                    for k, v in self.items()})


def tracked(value):
    """``value`` as a TrackedState if it is a plain dict (the same object if already tracked)."""
    if type(value) is dict:
        return TrackedState(value)
    return value
