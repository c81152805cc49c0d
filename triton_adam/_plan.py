"""The step plan: which tensors go into which launch, and the device tables behind each launch.

Building a plan validates everything and allocates tables; it happens on the first step and again
only when something it depends on changes (which params have grads, any param's address, the
param groups' flags, a loaded state). Every other step only gathers the grads' addresses, uploads
them if they moved, uploads the hyperparameters if they changed, and launches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from . import _validation
from .kernels import adam_step as K

# Elements per program and warps per program of the step kernel (16 float32 per thread), and
# the tile a program updates at a time: all of it when 16-byte aligned, half otherwise (scalar
# accesses need more registers: a whole block spills; half of one does not, with up to 162
# registers; a quarter spilled again for bfloat16 amsgrad under ptxas 13).
BLOCK_SIZE = 4096
NUM_WARPS = 8
ALIGNED_TILE_SIZE = 4096
UNALIGNED_TILE_SIZE = 2048
ALIGNMENT = 16

_TRITON_DTYPES = None


def _triton_dtype(dtype: torch.dtype):
    global _TRITON_DTYPES
    if _TRITON_DTYPES is None:
        import triton.language as tl
        _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                          torch.float16: tl.float16}
    return _TRITON_DTYPES[dtype]


TRITON_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, what: str) -> str:
    """'triton' or 'torch' for tensors on ``device`` of ``dtype``, or a clear error."""
    real_dtype = dtype.to_real() if dtype.is_complex else dtype
    triton_runs_here = device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())
    if requested == "torch":
        return "torch"
    if requested == "triton":
        if not triton_runs_here:
            raise RuntimeError(
                f"backend='triton' cannot update {what}: the Triton kernels run on CUDA tensors, "
                "or on CPU tensors with TRITON_INTERPRET=1 set before triton is imported")
        if real_dtype not in TRITON_PARAM_DTYPES:
            raise TypeError(f"backend='triton' cannot update {what}: the kernels take float32, "
                            "bfloat16 and float16 params (use backend='auto' or 'torch')")
        return "triton"
    if triton_runs_here and real_dtype in TRITON_PARAM_DTYPES:
        return "triton"
    return "torch"


@dataclass
class Member:
    """One param taking part in the step, with the views the kernels use."""
    group_index: int
    position: int
    param: Tensor
    flat_param: Tensor  # real view of a complex param, else the param
    state: dict
    stride: tuple
    numel: int
    dtype: torch.dtype

    def flat(self, tensor: Tensor) -> Tensor:
        return torch.view_as_real(tensor) if tensor.is_complex() else tensor


class HyperTable:
    """float64 ``[n_groups, HYPER_WIDTH]`` on one device; uploaded only when a value changes.

    A tensor lr on the table's device is copied device-side every step, so a captured CUDA graph
    follows the lr tensor's later values.
    """

    def __init__(self, device: torch.device, n_groups: int):
        self.device = device
        self.values = None
        self.table = torch.zeros((n_groups, int(K.HYPER_WIDTH)), dtype=torch.float64, device=device)
        self._keep_alive = []  # host buffers read by captured copies

    def update(self, groups) -> Tensor:
        rows, device_lrs = [], []
        for index, group in enumerate(groups):
            lr = group["lr"]
            if isinstance(lr, Tensor) and lr.device == self.device and self.device.type != "cpu":
                device_lrs.append((index, lr))
                lr = 0.0
            beta1, beta2 = group["betas"]
            rows.append((float(lr), float(beta1), float(beta2), float(group["eps"]),
                         float(group["weight_decay"]),
                         float(bool(group.get("decoupled_weight_decay", False))),
                         float(bool(group["maximize"]))))
        if rows != self.values:
            host = torch.zeros((len(rows), int(K.HYPER_WIDTH)), dtype=torch.float64)
            host[:, :7] = torch.tensor(rows, dtype=torch.float64)
            _upload(host, self.table, self._keep_alive)
            self.values = rows
        for index, lr in device_lrs:
            self.table[index, int(K.HYP_LR)].copy_(lr)
        return self.table


def _upload(host: Tensor, device_tensor: Tensor, keep_alive: list) -> None:
    """Copy a small host tensor into ``device_tensor`` without waiting for the device."""
    if device_tensor.device.type == "cpu":
        device_tensor.copy_(host)
        return
    pinned = host.pin_memory()
    device_tensor.copy_(pinned, non_blocking=True)
    if torch.cuda.is_current_stream_capturing():
        # A captured copy re-reads this host buffer at every replay.
        keep_alive.append(pinned)


def build_block_map(blocks_per_tensor: np.ndarray) -> np.ndarray:
    """int32 ``[n_blocks, 2]``: (tensor index, block index in that tensor) for each program.

    Block indices stay int32 (2**31 blocks of BLOCK_SIZE elements); the kernel widens them to
    int64 before multiplying by BLOCK_SIZE.
    """
    blocks_per_tensor = np.asarray(blocks_per_tensor, dtype=np.int64)
    n_blocks = int(blocks_per_tensor.sum())
    if n_blocks >= 2**31:
        raise ValueError(f"{n_blocks} blocks exceed one launch's grid; split the model")
    tensor_index = np.repeat(np.arange(len(blocks_per_tensor), dtype=np.int32),
                             blocks_per_tensor)
    first_block = np.cumsum(blocks_per_tensor) - blocks_per_tensor
    block_index = np.arange(n_blocks, dtype=np.int64) - np.repeat(first_block, blocks_per_tensor)
    return np.ascontiguousarray(np.stack([tensor_index, block_index.astype(np.int32)], axis=1))


class TritonBucket:
    """Members sharing device, dtypes and flags: one coefficient launch and one step launch."""

    def __init__(self, members, device, amsgrad):
        self.members = members
        self.device = device
        self.amsgrad = amsgrad
        self.index = [(m.group_index, m.position) for m in members]
        n = len(members)
        dtype = members[0].flat_param.dtype
        table = np.zeros((max(n, 1), int(K.TABLE_WIDTH)), dtype=np.int64)
        for row, m in enumerate(members):
            s = m.state
            table[row, K.COL_PARAM] = m.flat_param.data_ptr()
            table[row, K.COL_EXP_AVG] = m.flat(s["exp_avg"]).data_ptr()
            table[row, K.COL_EXP_AVG_SQ] = m.flat(s["exp_avg_sq"]).data_ptr()
            if amsgrad:
                table[row, K.COL_MAX_EXP_AVG_SQ] = m.flat(s["max_exp_avg_sq"]).data_ptr()
            table[row, K.COL_STEP] = s["step"].data_ptr()
            table[row, K.COL_NUMEL] = m.flat_param.numel()
            table[row, K.COL_GROUP] = m.group_index
        columns = [K.COL_PARAM, K.COL_EXP_AVG, K.COL_EXP_AVG_SQ]
        columns += [K.COL_MAX_EXP_AVG_SQ] if amsgrad else []
        addresses = table[:n, [int(c) for c in columns]]
        self.static_aligned = not (addresses % ALIGNMENT).any()
        blocks_per_tensor = -(-table[:n, int(K.COL_NUMEL)] // BLOCK_SIZE)
        block_map = build_block_map(blocks_per_tensor)
        self.n_blocks = len(block_map)
        self.tensor_table = torch.from_numpy(table).to(device)
        self.block_map = torch.from_numpy(block_map).to(device)
        self.coef_table = torch.empty((max(n, 1), int(K.COEF_WIDTH)), dtype=torch.float32,
                                      device=device)
        self.grad_table = torch.zeros(max(n, 1), dtype=torch.int64, device=device)
        self.grad_ptrs = None
        self.grads_aligned = False
        self._keep_alive = []
        self.spec = dict(
            PARAM_DTYPE=_triton_dtype(dtype), GRAD_DTYPE=_triton_dtype(dtype),
            STATE_DTYPE=_triton_dtype(dtype), AMSGRAD=amsgrad,
        )

    def launch(self, grads, hyper_table, grad_scale, found_inf):
        n = len(self.members)
        ptrs = np.fromiter((g.data_ptr() for g in grads), dtype=np.int64, count=n)
        if self.grad_ptrs is None or not np.array_equal(ptrs, self.grad_ptrs):
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing() \
                    and self.grad_ptrs is not None:
                raise RuntimeError(
                    "triton-adam: grads moved to new memory during CUDA graph capture; run the "
                    "step eagerly once with the same grads (static grads) before capturing")
            _upload(torch.from_numpy(ptrs), self.grad_table[:n], self._keep_alive)
            self.grad_ptrs = ptrs
            self.grads_aligned = not (ptrs % ALIGNMENT).any()
        aligned = self.static_aligned and self.grads_aligned
        K.launch_adam_coefficients(self.tensor_table, hyper_table, self.coef_table, found_inf, n)
        K.launch_adam_step(
            self.tensor_table, self.grad_table, self.block_map, self.coef_table, grad_scale,
            found_inf, self.n_blocks, dict(self.spec, ALIGNED=aligned), BLOCK_SIZE,
            ALIGNED_TILE_SIZE if aligned else UNALIGNED_TILE_SIZE, NUM_WARPS)


class TorchBucket:
    """Members of one param group on one device and dtype, stepped by torch's fused kernels."""

    def __init__(self, members, group_index, decoupled, maximize, amsgrad):
        self.members = members
        self.group_index = group_index
        self.index = [(m.group_index, m.position) for m in members]
        self.decoupled, self.amsgrad, self.maximize = decoupled, amsgrad, maximize
        self.params = [m.flat_param for m in members]
        self.exp_avgs = [m.flat(m.state["exp_avg"]) for m in members]
        self.exp_avg_sqs = [m.flat(m.state["exp_avg_sq"]) for m in members]
        self.max_exp_avg_sqs = ([m.flat(m.state["max_exp_avg_sq"]) for m in members]
                                if amsgrad else [])
        self.steps = [m.state["step"] for m in members]

    def launch(self, grads, group, grad_scale, found_inf):
        grads = [torch.view_as_real(g) if g.is_complex() else g for g in grads]
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        if isinstance(lr, Tensor) and lr.device != self.params[0].device:
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
            torch._foreach_sub_(self.steps, [found_inf.to(self.steps[0].device)] * len(self.steps))


def state_key_names(amsgrad: bool):
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")


class StepPlan:
    """Buckets and hyperparameter tables for one arrangement of params with grads."""

    def __init__(self, optimizer, grads_by_group, states, signature):
        """``states`` maps each param with a grad to its state dict (new ones not yet stored)."""
        self.signature = signature
        groups = optimizer.param_groups
        members_by_key: dict = {}
        for gi, (group, grads) in enumerate(zip(groups, grads_by_group)):
            decoupled = bool(group.get("decoupled_weight_decay", False))
            amsgrad, maximize = bool(group["amsgrad"]), bool(group["maximize"])
            for pi, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                backend = choose_backend(optimizer.backend, param.device, param.dtype,
                                         _validation.describe(gi, pi, param))
                state = states[param]
                _validation.check_state(gi, pi, param, state, amsgrad)
                flat = torch.view_as_real(param) if param.is_complex() else param
                member = Member(gi, pi, param, flat, state, tuple(param.stride()),
                                param.numel(), param.dtype)
                _check_state_layout(member, amsgrad)
                # Hyperparameters and the decoupled/maximize flags are per tensor in the Triton
                # launch; torch's fused kernels take them per call, hence per group.
                key = (backend, param.device, flat.dtype, amsgrad)
                if backend == "torch":
                    key = key + (gi, decoupled, maximize)
                members_by_key.setdefault(key, []).append(member)

        by_device: dict = {}
        for members in members_by_key.values():
            for m in members:
                by_device.setdefault(m.param.device, []).append(m)
        for members in by_device.values():
            tensors, names = [], []
            for m in members:
                tensors += [m.flat_param] + [m.flat(m.state[k])
                                             for k in state_key_names("max_exp_avg_sq" in m.state)]
                names += [_validation.describe(m.group_index, m.position, m.param)] + [
                    f"state '{k}' of {_validation.describe(m.group_index, m.position, m.param)}"
                    for k in state_key_names("max_exp_avg_sq" in m.state)]
            _validation.check_no_overlap(tensors, names)

        self.triton_buckets, self.torch_buckets = [], []
        for key, members in members_by_key.items():
            backend, device, _, amsgrad = key[:4]
            if backend == "triton":
                self.triton_buckets.append(TritonBucket(members, device, amsgrad))
            else:
                self.torch_buckets.append(TorchBucket(members, *key[4:7], amsgrad=amsgrad))
        devices = {b.device for b in self.triton_buckets}
        self.hyper_tables = {d: HyperTable(d, len(groups)) for d in devices}
        self.members = [m for ms in members_by_key.values() for m in ms]

    def run(self, optimizer, grads_by_group, grad_scale, found_inf):
        groups = optimizer.param_groups
        for table in self.hyper_tables.values():
            table.update(groups)
        for bucket in self.triton_buckets:
            grads = [_kernel_grad(bucket.members[i], grads_by_group[gi][pi])
                     for i, (gi, pi) in enumerate(bucket.index)]
            scale, inf = _on_device(grad_scale, bucket.device), _on_device(found_inf,
                                                                           bucket.device)
            bucket.launch(grads, self.hyper_tables[bucket.device].table, scale, inf)
        for bucket in self.torch_buckets:
            grads = [_kernel_grad(bucket.members[i], grads_by_group[gi][pi])
                     for i, (gi, pi) in enumerate(bucket.index)]
            device = bucket.params[0].device
            bucket.launch(grads, groups[bucket.group_index], _on_device(grad_scale, device),
                          _on_device(found_inf, device))


def _on_device(tensor, device):
    if tensor is None:
        return None
    return tensor.to(device=device, dtype=torch.float32, non_blocking=True)


def _kernel_grad(member: Member, grad: Tensor) -> Tensor:
    """The grad in its param's memory layout (a copy only if autograd gave it other strides)."""
    if grad.stride() != member.stride and member.numel > 1:
        grad = torch.empty_like(member.param).copy_(grad)
    return grad


def _check_state_layout(member: Member, amsgrad: bool) -> None:
    """Give loaded state tensors their param's strides (a value-preserving fix-up)."""
    for key in state_key_names(amsgrad):
        value = member.state[key]
        if value.stride() != member.stride and member.numel > 1:
            member.state[key] = torch.empty_like(member.param).copy_(value)
