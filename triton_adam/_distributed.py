"""DTensor params (FSDP2, HSDP, tensor parallel) and the collectives of a distributed step.

The kernels update memory, so a DTensor param is stepped through its local shard: addresses, numel
and strides come from ``param._local_tensor`` (a plain attribute read, no DTensor dispatch), never
from the global metadata. State tensors are DTensors with the param's mesh and placements, so
torch's distributed state-dict helpers and DCP see them as torch's own optimizers make them.

The grad norm of a sharded model is a sum over shards: each rank reduces its local shards into one
partial sum per *segment* (params sharing a mesh and the set of mesh dims they are sharded over),
then one all-reduce per mesh dimension adds the partials of the segments sharded over that dim
(replicated dims are counted once), and a non-finite count rides along in every all-reduce so that
all ranks decide the same skip. Every rank joins every all-reduce, shards or grads or not, because
the segments come from all of the optimizer's params, not from those with grads this step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ._tables import to_device

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = None


def is_dtensor(tensor) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2/TP param, grad or state)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """The memory the kernels update: a DTensor's local shard, a plain tensor itself."""
    if DTensor is not None and isinstance(tensor, DTensor):
        return tensor._local_tensor
    return tensor


def check_param(what: str, param: Tensor) -> None:
    """Refuse DTensor params whose local shards do not add up to the param (Partial)."""
    if is_dtensor(param) and any(p.is_partial() for p in param.placements):
        raise ValueError(f"{what} has placements {param.placements}: a Partial param is not a "
                         "tensor the optimizer can update shard by shard; redistribute it to "
                         "Shard/Replicate placements")


def local_grad(param: Tensor, grad: Tensor, describe) -> Tensor:
    """The grad's local shard laid out as the param's, redistributing it when needed.

    A grad whose placements differ from its param's (e.g. a ``Partial`` grad of a replicated
    param under sequence parallel) is redistributed first, as torch's DTensor dispatch does;
    stepping its raw local tensor would make replicas drift apart. ``describe()`` names the
    param in errors (called only then: this runs for every grad at every step).
    """
    param_is_dtensor, grad_is_dtensor = is_dtensor(param), is_dtensor(grad)
    if not param_is_dtensor:
        if grad_is_dtensor:
            raise TypeError(f"{describe()} is a plain tensor but its grad is a DTensor")
        return grad
    if not grad_is_dtensor:
        raise TypeError(f"{describe()} is a DTensor but its grad is a plain tensor")
    param_spec, grad_spec = param._spec, grad._spec
    if grad_spec.placements != param_spec.placements or grad_spec.mesh is not param_spec.mesh:
        if grad_spec.mesh != param_spec.mesh:
            raise ValueError(f"{describe()}: its grad lives on mesh {grad_spec.mesh}, the param "
                             f"on {param_spec.mesh}")
        if grad_spec.placements != param_spec.placements:
            grad = grad.redistribute(param_spec.mesh, param_spec.placements)
    return grad._local_tensor


def zeros_like(param: Tensor, dtype=None) -> Tensor:
    """Zero state for ``param`` (in ``dtype``, default the param's): a DTensor with its mesh
    and placements for a DTensor param."""
    return shaped_like(param, torch.zeros_like(local(param), dtype=dtype,
                                               memory_format=torch.preserve_format))


def shaped_like(param: Tensor, shard: Tensor) -> Tensor:
    """State for ``param`` whose local shard is ``shard`` (laid out as the param's): a DTensor
    with the param's mesh and placements for a DTensor param, ``shard`` itself otherwise."""
    if not is_dtensor(param):
        return shard
    # explicit shape and stride: shards are uneven, so the local shape does not give them
    return DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def adopt_state(what: str, key: str, param: Tensor, value: Tensor) -> Tensor:
    """A loaded state tensor in the form the optimizer keeps for ``param`` (value-preserving).

    For a DTensor param, a plain tensor of the global shape (a full checkpoint loaded by hand)
    becomes a DTensor holding this rank's shard of it; a DTensor with other placements is
    redistributed. Anything else is returned as it is and checked by ``_validation``.
    """
    if not is_dtensor(param):
        if is_dtensor(value):
            raise TypeError(f"{what}: state '{key}' is a DTensor but the param is a plain tensor")
        return value
    if not is_dtensor(value):
        if value.shape != param.shape:
            return value  # refused with the shapes by _validation.check_state
        value = value.to(device=param.device)
        # src_data_rank=None: every rank holds the full tensor and keeps its own shard (no
        # collective); the sharding rule is DTensor's own, uneven and strided shards included.
        return distribute_tensor(value.detach(), param.device_mesh, param.placements,
                                 src_data_rank=None)
    if value.device_mesh != param.device_mesh or value.placements != param.placements:
        value = value.redistribute(param.device_mesh, param.placements)
    return value


def random_stream(param: Tensor):
    """(global element index of the local shard's first element, shard number) for
    stochastic rounding's counter: the random numbers of element i of the local shard are
    counted by (offset + i, shard).

    A plain tensor is (0, 0). A shard whose elements are one run of the global (row-major)
    order, as FSDP2's dim-0 shards are, is (its global offset, 0): it draws what the unsharded
    param would, at any world size. Any other shard (another dim, several dims, strided
    shards) is (0, 1 + its index among the shards), which keeps every element's counter
    unique; replicas (Replicate dims) share their shard's number, so they round alike.
    """
    if not is_dtensor(param) or param._local_tensor.numel() == 0:
        return 0, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, param.placements
    shape, offsets = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    sharded = [d for d, (n, o, g) in enumerate(zip(shape, offsets, param.shape))
               if n != g or o != 0]
    strided = any(type(p).__name__ == "_StridedShard" for p in placements)
    one_run = not strided and (not sharded or (
        len(sharded) == 1 and all(param.shape[d] == 1 for d in range(sharded[0]))))
    if one_run:
        strides = torch.empty(param.shape, device="meta").stride()
        return int(sum(o * s for o, s in zip(offsets, strides))), 0
    coordinate = mesh.get_coordinate()
    shard = 0
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            shard = shard * mesh.size(dim) + coordinate[dim]
    return 0, 1 + shard


def check_local_layout(what: str, key: str, param: Tensor, value: Tensor) -> None:
    """Raise if a DTensor state's local shard does not match the param's local shard."""
    if is_dtensor(param) and local(value).shape != param._local_tensor.shape:
        raise ValueError(f"{what}: state '{key}' has a local shard of shape "
                         f"{tuple(local(value).shape)}, the param's is "
                         f"{tuple(param._local_tensor.shape)}")


@dataclass(frozen=True)
class Segment:
    """Params whose squared-grad sums add up over the same mesh dims."""
    mesh: object  # a DeviceMesh, or None for plain tensors (their grads are whole on every rank)
    sharded_dims: tuple


def segment_of(param: Tensor) -> Segment:
    if not is_dtensor(param):
        return Segment(None, ())
    # Shard and _StridedShard (FSDP over tensor parallel) split the elements; the latter is
    # not a Shard to is_shard(), so test for what is not split
    dims = tuple(d for d, p in enumerate(param.placements)
                 if not (p.is_replicate() or p.is_partial()))
    return Segment(param.device_mesh, dims)


class NormReduction:
    """Cross-rank reduction of per-segment grad-norm partials: one all-reduce per mesh dim.

    Built from every param of the optimizer (the same on every rank), so all ranks issue the
    same collectives in the same order.
    """

    def __init__(self, params):
        self.segments: list[Segment] = []
        self.index: dict[Segment, int] = {}
        for param in params:
            segment = segment_of(param)
            if segment not in self.index:
                self.index[segment] = len(self.segments)
                self.segments.append(segment)
        meshes = []
        for segment in self.segments:
            if segment.mesh is not None and segment.mesh not in meshes:
                meshes.append(segment.mesh)
        # (process group, mask of the segments summed over it), one per distinct group: a
        # submesh's dim (FSDP's dp mesh beside the 2-D dp x tp mesh) shares its parent's group,
        # so it adds no collective. Sums over different groups commute, so the order is free
        # (but the same on every rank). The last mask entry is the non-finite count, reduced
        # over every group so every rank sees all of it.
        masks = {}
        for mesh in meshes:
            for dim in range(mesh.ndim):
                mask = masks.setdefault(mesh.get_group(dim), [False] * len(self.segments))
                for i, s in enumerate(self.segments):
                    mask[i] = mask[i] or (s.mesh == mesh and dim in s.sharded_dims)
        self.steps = [(group, mask + [True]) for group, mask in masks.items()]

    @property
    def distributed(self) -> bool:
        return bool(self.steps)

    def segment_index(self, param: Tensor) -> int:
        return self.index[segment_of(param)]

    def reduce(self, partials: Tensor, nonfinite: Tensor, norm_type: float):
        """All-reduce ``partials`` (float32 ``[n_segments]``: sums of |g|**p, or max |g| for
        inf) and the non-finite flag across ranks; return (total 0-d, flag 0-d), on the device.

        No host synchronisation: the collectives are issued on the device's stream.
        """
        is_max = norm_type == float("inf")
        payload = torch.cat([partials.to(torch.float32), nonfinite.reshape(1).to(torch.float32)])
        op = torch.distributed.ReduceOp.MAX if is_max else torch.distributed.ReduceOp.SUM
        for group, mask in self.steps:
            mask = _device_mask(tuple(mask), payload.device)
            # segments not sharded over this dim: zeros (or -inf-free zeros for MAX, as every
            # partial is >= 0) go in, their own values are kept
            reduced = torch.where(mask, payload, torch.zeros_like(payload))
            torch.distributed.all_reduce(reduced, op=op, group=group)
            payload = torch.where(mask, reduced, payload)
        sums, flag = payload[:-1], payload[-1]
        if is_max:
            total = sums.max() if len(sums) else sums.new_zeros(())
            # a MAX all-reduce may drop a NaN (NCCL's max is fmax-like); the non-finite count
            # cannot: a finite max with non-finite elements somewhere means a NaN
            total = torch.where((flag != 0) & total.isfinite(), float("nan"), total)
        else:
            total = sums.sum()
        return total, (flag != 0).to(torch.float32)



_MASKS: dict = {}


def _device_mask(mask: tuple, device) -> Tensor:
    """The mask as a bool device tensor, made once per process (no host sync per step)."""
    key = (mask, device)
    if key not in _MASKS:
        _MASKS[key] = to_device(np.array(mask, dtype=np.bool_), device)
    return _MASKS[key]


def finish_norm(total: Tensor, norm_type: float, grad_scale=None) -> Tensor:
    """The norm from a reduced total (a sum of |g|**p, or the max), unscaled by ``grad_scale``."""
    if norm_type == 2.0:
        norm = total.sqrt()
    elif norm_type in (1.0, float("inf")):
        norm = total
    else:
        norm = total.pow(1.0 / norm_type)
    if grad_scale is not None:
        norm = norm / grad_scale.to(norm.device)
    return norm
