"""The steady-state step: everything a plan depends on, confirmed in a few whole-list passes.

Once a step has been fully checked (``StepPlan`` built or reused, every grad gathered through
``_plan._gather_grads``), the next steps of a training loop usually differ from it only in the
grads' contents, and often in the grads' objects and addresses (``zero_grad(set_to_none=True)``).
``SteadyStep`` records what that step saw, as flat lists, and at the next step compares:

* the param groups' lists and flags, and every param's (local) address;
* that no state dict changed (``_tracked_state.EPOCH``: O(1), whatever the number of tensors);
* the grads: the same objects as last step (their ids, which name them while weak references
  to them report no death, so a freed grad is never kept alive) at the same addresses; or, for
  moved or new grad objects, the same dtypes, devices, layouts, sizes and strides as the
  checked ones (dynamo's C++ tensor guard, one call for all of them; without it, one C-level
  pass per property).

Each comparison is one pass over a list in C (``list(map(...))`` and ``==`` on lists of ints
and interned objects), never a Python call per tensor. Anything that differs sends the step to
the fully checked path (``optimizer._checked_step``), which raises the clear errors, redistributes,
copies or rebuilds as before; so a steady step can only be faster, never less checked in what
it launches with, with one exception: a grad object already checked, at the same address, is not
read again, so an in-place change of its shape that keeps its memory (``resize_`` to fewer
elements, ``t_()``, ``as_strided_``) goes unseen; the checked path compared every grad's element
count at every step.
"""
from __future__ import annotations

import weakref
from itertools import chain, repeat
from operator import attrgetter, is_

import numpy as np
import torch
from torch import Tensor

from . import _distributed
from ._tracked_state import EPOCH

_GRAD = attrgetter("grad")
_LOCAL = attrgetter("_local_tensor")
_SPEC = attrgetter("_spec")
_DTYPE = attrgetter("dtype")
# while the grads are new objects at every step, how often to take references to them anew
REFERENCE_EVERY = 16


def group_flags(group: dict) -> tuple:
    """The options of a param group that decide how its params are laid into launches."""
    return (bool(group["amsgrad"]), bool(group["maximize"]),
            bool(group.get("decoupled_weight_decay", False)), group.get("state_dtype"),
            group.get("master_weights", False), bool(group.get("kahan_summation", False)),
            bool(group.get("stochastic_rounding", False)),
            group.get("min_quantized_numel"), group.get("quant_block_size"),
            bool(group.get("differentiable", False)))


class _GradObjects:
    """Which grad objects a step saw (None where a param had none), recognised again by one
    pass of ``id``.

    An id names one object only while that object lives, so each grad is weakly referenced
    with a callback that records its death (``list.append``: C, no Python frame). While no
    referent has died, equal ids are the same objects; once one has (a freed grad, as after
    ``zero_grad(set_to_none=True)``) the answer is "not the same" without a pass. The weak
    references keep no grad alive."""

    def __init__(self, grads, any_missing: bool):
        self.deaths = []
        note = self.deaths.append
        if any_missing:
            self.refs = [None if grad is None else weakref.ref(grad, note) for grad in grads]
        else:
            self.refs = list(map(weakref.ref, grads, repeat(note)))
        self.ids = list(map(id, grads))

    def same(self, grads) -> bool:
        if self.deaths or (grads and id(grads[0]) != self.ids[0]):
            return False  # (the first grad new: a quick no, as at every step of fresh grads)
        return list(map(id, grads)) == self.ids


def _metadata(grads) -> tuple:
    """Every property of the grads the kernels rely on, one C-level pass each."""
    return (list(map(_DTYPE, grads)), list(map(Tensor.stride, grads)),
            list(map(Tensor.numel, grads)), list(map(Tensor.get_device, grads)),
            list(map(Tensor.is_conj, grads)))


def _tensor_guard(grads):
    """dynamo's C++ tensor check for these grads (dtype, device, dispatch keys, so layout and
    lazy conjugation, requires_grad, every size and stride) in one call, ~50 ns a tensor; or
    None where this torch has no such check (a private API: the passes of ``_metadata`` then
    do the same work)."""
    try:
        from torch._C._dynamo.guards import TensorGuards

        guard = TensorGuards(*grads, dynamic_dims_sizes=[list(g.size()) for g in grads],
                             dynamic_dims_strides=[list(g.stride()) for g in grads])
        return guard if guard.check(*grads) else None
    except Exception:  # noqa: BLE001 - any change of the private API: use the passes
        return None


class _GradCheck:
    """Whether grads have the checked grads' dtypes, devices, layouts, sizes and strides.

    Needed for every grad object not seen before, and for one whose memory was swapped:
    torch's ``.grad`` setter checks size, dtype and device when a grad is assigned, but
    ``.data =`` after it does not, and it accepts any strides."""

    def __init__(self, grads):
        self.guard = _tensor_guard(grads)
        self.metadata = _metadata(grads) if self.guard is None else None

    def matches(self, grads) -> bool:
        if self.guard is None:
            return _metadata(grads) == self.metadata
        try:
            return self.guard.check(*grads)
        except Exception:  # noqa: BLE001 - a grad it cannot read: the checked path's error
            return False


class SteadyStep:
    """What a fully checked step saw, and the whole-list comparisons that confirm it."""

    def __init__(self, optimizer, plan, bucket_grads):
        groups = optimizer.param_groups
        self.groups = groups
        self.param_lists = [group["params"] for group in groups]
        self.flags = [group_flags(group) for group in groups]
        flat = list(chain.from_iterable(self.param_lists))
        self.n_params = len(flat)
        self.sharded = any(map(_distributed.is_dtensor, flat))
        # every param a DTensor (FSDP2): their local shards by a C-level attribute read
        self.all_sharded = self.sharded and all(map(_distributed.is_dtensor, flat))
        self.param_ptrs = self._param_ptrs()
        self.state_table = optimizer.state
        self.epoch = EPOCH[0]

        first = np.cumsum([0] + [len(params) for params in self.param_lists])
        buckets = plan.triton_buckets + plan.torch_buckets
        members = [m for bucket in buckets for m in bucket.members]
        positions = [int(first[m.group_index]) + m.position for m in members]
        self.take = (None if positions == list(range(self.n_params))
                     else (lambda grads, index=positions: list(map(grads.__getitem__, index))))
        self.no_grad_positions = sorted(set(range(self.n_params)) - set(positions))
        self.n_triton = len(plan.triton_buckets)
        bounds = np.cumsum([0] + [len(bucket.members) for bucket in buckets])
        self.bounds = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        if self.sharded:
            self.param_specs = [getattr(m.param, "_spec", None) for m in members]

        grads = list(map(_GRAD, flat))
        member_grads = self._members(grads)
        self.objects = _GradObjects(grads, bool(self.no_grad_positions))
        self.new_grad_steps = 0
        shards = self._grad_shards(member_grads)
        # grads to redistribute (or plain and DTensor params mixed): always the checked path
        self.usable = shards is not None
        if not self.usable:
            return
        # the addresses of self.objects' shards, and whether the tables point there now
        self.object_ptrs = list(map(Tensor.data_ptr, shards))
        self.tables_at_objects = True
        self.grad_check = _GradCheck(shards)
        # grads laid out unlike their params are copied at every step, as the checked path does
        kernel = [g for grads in bucket_grads for g in grads]
        self.copied = [i for i, (shard, used) in enumerate(zip(shards, kernel))
                       if used is not shard]
        self.members = members

    def _param_ptrs(self) -> list:
        """Every param's (local shard's) address, in the groups' order."""
        params = chain.from_iterable(self.param_lists)
        if self.sharded:  # a list: _locals may read it twice
            params = self._locals(list(params))
        return list(map(Tensor.data_ptr, params))

    def _locals(self, tensors):
        if not self.sharded:
            return tensors
        if self.all_sharded:
            try:
                return list(map(_LOCAL, tensors))
            except AttributeError:  # a plain param now: the addresses differ, checked path
                return list(map(_distributed.local, tensors))
        return list(map(_distributed.local, tensors))

    def _members(self, grads):
        return grads if self.take is None else self.take(grads)

    def _grad_shards(self, member_grads):
        """The grads' local shards (the grads themselves unless sharded), or None when a grad
        has other placements than its param's (redistributed on the checked path)."""
        if not self.sharded:
            return member_grads
        try:
            specs = list(map(_SPEC, member_grads))
        except AttributeError:
            return None  # a plain grad (or param) among DTensors
        if not all(map(is_, specs, self.param_specs)) and not all(
                spec.mesh is own.mesh and spec.placements == own.placements
                for spec, own in zip(specs, self.param_specs)):
            return None
        return list(map(_LOCAL, member_grads))

    def bucket_grads(self, optimizer):
        """This step's grads per bucket (triton buckets first) and their addresses in member
        order (None: unchanged since the last step), or None when anything differs from the
        checked step: the caller then takes the fully checked path."""
        groups = optimizer.param_groups
        if (not self.usable or groups is not self.groups or len(groups) != len(self.param_lists)
                or optimizer.state is not self.state_table or EPOCH[0] != self.epoch):
            return None
        for group, params, flags in zip(groups, self.param_lists, self.flags):
            if group["params"] is not params or group_flags(group) != flags:
                return None
        grads = list(map(_GRAD, chain.from_iterable(self.param_lists)))
        if len(grads) != self.n_params:
            return None
        same_objects = self.objects.same(grads)
        if self._param_ptrs() != self.param_ptrs:
            return None  # a param moved (.data =, .to(), a resharded DTensor)
        if not same_objects and self.no_grad_positions and list(
                map(grads.__getitem__, self.no_grad_positions)).count(None) != len(
                self.no_grad_positions):
            return None  # a param without a grad has one now
        member_grads = self._members(grads)
        try:
            shards = self._grad_shards(member_grads)
            if shards is None:
                return None
            if same_objects:  # compared as a list: no array unless they moved
                ptr_list, ptrs = list(map(Tensor.data_ptr, shards)), None
            else:
                ptrs = np.fromiter(map(Tensor.data_ptr, shards), dtype=np.int64,
                                   count=len(shards))
        except (TypeError, RuntimeError):
            return None  # a grad went missing (None), or has no storage (sparse)
        if same_objects:
            moved = ptr_list != self.object_ptrs
            if moved:  # the same grad objects in new memory (.data =): checked again
                if not self.grad_check.matches(shards):
                    return None
                self.object_ptrs = ptr_list
            if moved or not self.tables_at_objects:
                ptrs = np.array(ptr_list, dtype=np.int64)
        else:
            if not self.grad_check.matches(shards):
                return None
            # new grad objects at every step (zero_grad(set_to_none=True)) are the usual case:
            # referencing each new set costs an allocation per grad, so only every
            # REFERENCE_EVERY steps look again for grads that stay (set_to_none=False)
            self.new_grad_steps += 1
            if self.new_grad_steps % REFERENCE_EVERY == 0:
                self.objects = _GradObjects(grads, bool(self.no_grad_positions))
                self.object_ptrs = ptrs.tolist()
                same_objects = True  # the tables are about to point at them
        self.tables_at_objects = same_objects
        kernel_grads = shards
        if self.copied:
            # grads laid out unlike their params: a copy in the param's layout, every step
            if ptrs is None:
                ptrs = np.array(ptr_list, dtype=np.int64)
            kernel_grads, ptrs = list(shards), ptrs.copy()
            for i in self.copied:
                like = _distributed.local(self.members[i].param)
                kernel_grads[i] = torch.empty_like(like, dtype=shards[i].dtype).copy_(shards[i])
                ptrs[i] = kernel_grads[i].data_ptr()
        per_bucket = [kernel_grads[a:b] for a, b in self.bounds] if len(self.bounds) > 1 \
            else [kernel_grads]
        return per_bucket, ptrs

    def point_buckets(self, plan, ptrs) -> None:
        """Upload the moved grad addresses into each triton bucket's grad table."""
        if ptrs is None:
            return
        for bucket, (a, b) in zip(plan.triton_buckets, self.bounds[:self.n_triton]):
            bucket.prepare_pointers(ptrs[a:b])
