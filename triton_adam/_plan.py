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

from . import _distributed, _precision, _quantize, _validation
from ._distributed import local
from ._grad_norm import TritonGradNorm
from ._tables import (ALIGNMENT, build_block_map, on_device, step_block_size,
                      step_max_registers, step_num_warps, step_tile_size, to_device,
                      triton_dtype, upload)
from ._torch_backend import TorchBucket, grad_norm_and_nonfinite, segment_totals
from ._warmup import compile_plan
from .kernels import adam_step as K
from .kernels.moment_codes import QUANT_FP8, QUANT_INT4, QUANT_INT8, QUANT_NONE

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
    """One param taking part in the step, with the views the kernels use.

    For a DTensor param everything the kernels see (``flat_param``, ``stride``, ``numel``) is
    its local shard's; ``param`` stays the object the state is keyed on.
    """
    group_index: int
    position: int
    param: Tensor
    flat_param: Tensor  # the local tensor, as a real view if complex
    state: dict
    stride: tuple
    numel: int
    dtype: torch.dtype
    # the tensors whose addresses the tables hold (state tensors and their local shards): kept
    # alive here, and compared by identity each step so that a replaced state tensor (or a
    # DTensor state given a new local shard) rebuilds the tables instead of being written
    # through a stale address
    state_tensors: tuple = ()
    segment: int = 0  # the grad-norm segment (see _distributed.NormReduction)
    precision: _precision.Precision = None  # state dtype, master or compensation, rounding
    grad_dtype: torch.dtype = None  # the param's dtype, or float32 grads of 16-bit params
    # stochastic rounding's stream keys: the param's index in the optimizer and its shard's
    # number (see _distributed.random_stream), and the global element index of the local
    # shard's first element
    rng_tensor: int = 0
    rng_shard: int = 0
    rng_offset: int = 0

    @property
    def rng_stream(self) -> int:
        """The stream word of the kernels' counter: param index, shard number above it."""
        return self.rng_tensor | (self.rng_shard << 32)

    @classmethod
    def of(cls, group_index, position, param, state):
        shard = local(param)
        flat = torch.view_as_real(shard) if shard.is_complex() else shard
        return cls(group_index, position, param, flat, state, tuple(shard.stride()),
                   shard.numel(), param.dtype)

    def keep(self, keys) -> None:
        """Record the state tensors the tables are about to hold."""
        self.state_tensors = tuple((key, self.state[key], local(self.state[key])) for key in keys)

    def describe(self) -> str:
        return _validation.describe(self.group_index, self.position, self.param)

    @property
    def extra_key(self):
        """The state key of the master or compensation stepped with the param, or None."""
        return self.precision.extra_key if self.precision is not None else None

    @property
    def flat_grad_dtype(self) -> torch.dtype:
        """The grad dtype as the kernels read it (real for complex)."""
        dtype = self.grad_dtype or self.dtype
        return dtype.to_real() if dtype.is_complex else dtype

    @staticmethod
    def flat(tensor: Tensor) -> Tensor:
        """The memory of a state tensor (its local shard), as a real view if complex."""
        tensor = local(tensor)
        return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def hyper_row(group: dict, device: torch.device):
    """One param group's float64 hyperparameter row (HYP_* order), and its device-side entries.

    Tensor hyperparameters (lr, initial_lr as torch's schedulers record it for a tensor lr, betas)
    that live on ``device`` (a GPU) are not read on the host: their columns hold 0 here and the
    second result lists ``(column, tensor)`` to copy on the device, so the step never syncs.
    """
    on_device = []

    def value(column, x):
        if isinstance(x, Tensor) and x.device == device and device.type != "cpu":
            on_device.append((column, x))
            return 0.0
        return float(x)

    lr = group["lr"]
    beta1, beta2 = group["betas"]
    row = [0.0] * int(K.HYPER_WIDTH)
    row[int(K.HYP_LR)] = value(K.HYP_LR, lr)
    row[int(K.HYP_BETA1)] = value(K.HYP_BETA1, beta1)
    row[int(K.HYP_BETA2)] = value(K.HYP_BETA2, beta2)
    row[int(K.HYP_EPS)] = float(group["eps"])
    row[int(K.HYP_WEIGHT_DECAY)] = float(group["weight_decay"])
    row[int(K.HYP_DECOUPLED)] = float(bool(group.get("decoupled_weight_decay", False)))
    row[int(K.HYP_MAXIMIZE)] = float(bool(group["maximize"]))
    row[int(K.HYP_EPS_PAPER)] = float(group.get("eps_mode", "torch") == "paper")
    row[int(K.HYP_BIAS_CORRECTION)] = float(bool(group.get("bias_correction", True)))
    row[int(K.HYP_DECAY_SCHEDULE)] = float(group.get("weight_decay_mode", "torch") == "schedule")
    # without a scheduler, the schedule multiplier lr / initial_lr is 1
    row[int(K.HYP_INITIAL_LR)] = value(K.HYP_INITIAL_LR, group.get("initial_lr", lr)) or 1.0
    row[int(K.HYP_SEED)] = float(group.get("seed") or 0)
    return tuple(row), on_device


class HyperTable:
    """float64 ``[n_groups, HYPER_WIDTH]`` on one device; uploaded only when a value changes.

    Tensor hyperparameters on the table's device are copied device-side every step, so a captured
    CUDA graph follows their later values.
    """

    def __init__(self, device: torch.device, n_groups: int):
        self.device = device
        self.values = None
        self.table = torch.zeros((n_groups, int(K.HYPER_WIDTH)), dtype=torch.float64, device=device)
        self._keep_alive = []  # host buffers read by captured copies

    def update(self, groups, max_grad_norm) -> Tensor:
        rows, device_copies = [], []
        for index, group in enumerate(groups):
            row, on_device = hyper_row(group, self.device)
            row = list(row)
            row[int(K.HYP_MAX_GRAD_NORM)] = (float("inf") if max_grad_norm is None
                                             else float(max_grad_norm))
            rows.append(tuple(row))
            device_copies += [(index, column, tensor) for column, tensor in on_device]
        if rows != self.values:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "triton-adam: a float hyperparameter (lr, betas, eps, weight_decay, ...) "
                    "changed during CUDA graph capture; a captured step would keep the old value. "
                    "Use a tensor lr (and capturable=True) for schedules under graph capture")
            upload(torch.tensor(rows, dtype=torch.float64), self.table, self._keep_alive)
            self.values = rows
        for index, column, tensor in device_copies:
            self.table[index, int(column)].copy_(tensor, non_blocking=True)
        return self.table


@dataclass
class BlockRange:
    """Programs of one step launch: a block map of its own (a fresh, aligned allocation, so the
    launch specialises as the warm-up did) and whether all its tensors are 16-byte aligned."""
    block_map: Tensor
    n_blocks: int
    aligned: bool
    block_tensor: np.ndarray  # host copy: which member each program updates


class TritonBucket:
    """Members sharing device, dtypes and flags: one coefficient launch, and one step launch
    per alignment class.

    The step kernel moves 16 bytes per access only where every address of a tensor (param,
    states and this step's grad) is 16-byte aligned. Rather than dropping the whole bucket to
    scalar accesses for one misaligned tensor (DDP bucket views are element-aligned), the
    bucket's blocks go into two launches, aligned members first, regrouped only when the
    grads' alignment pattern changes.
    """

    def __init__(self, members, device, amsgrad):
        self.members = members
        self.device = device
        self.amsgrad = amsgrad
        self.index = [(m.group_index, m.position) for m in members]
        n = len(members)
        dtype = members[0].flat_param.dtype
        precision = members[0].precision  # the bucket's (small members: dense moments)
        state_dtype = precision.dense_dtype  # as the kernels read it: real for complex
        state_dtype = state_dtype.to_real() if state_dtype.is_complex else state_dtype
        extra_key = members[0].extra_key
        table = np.zeros((max(n, 1), int(K.TABLE_WIDTH)), dtype=np.int64)
        for row, m in enumerate(members):
            s = m.state
            table[row, K.COL_STEP] = s["step"].data_ptr()
            table[row, K.COL_NUMEL] = m.flat_param.numel()
            table[row, K.COL_GROUP] = m.group_index
            table[row, K.COL_RNG_STREAM] = m.rng_stream
            table[row, K.COL_RNG_OFFSET] = m.rng_offset
            if m.numel == 0:
                # An empty tensor or shard (its address may be 0 or odd) advances its step in
                # the coefficient kernel and takes no block: its addresses are never read.
                continue
            table[row, K.COL_PARAM] = m.flat_param.data_ptr()
            table[row, K.COL_EXP_AVG] = m.flat(s["exp_avg"]).data_ptr()
            table[row, K.COL_EXP_AVG_SQ] = m.flat(s["exp_avg_sq"]).data_ptr()
            if amsgrad:
                table[row, K.COL_MAX_EXP_AVG_SQ] = m.flat(s["max_exp_avg_sq"]).data_ptr()
            if extra_key:
                table[row, K.COL_MASTER] = m.flat(s[extra_key]).data_ptr()
            if m.precision.quantized:  # codes: their scales' addresses mark them
                for column, key in zip(QUANT_SCALE_COLUMNS, state_key_names(amsgrad)):
                    table[row, column] = s[_quantize.scale_key(key)].data_ptr()
        columns = [K.COL_PARAM, K.COL_EXP_AVG, K.COL_EXP_AVG_SQ]
        columns += [K.COL_MAX_EXP_AVG_SQ] if amsgrad else []
        columns += [K.COL_MASTER] if extra_key else []
        # (codes: 16-byte aligned bases; the float32 scales are read as one-element accesses
        # and need no promise)
        addresses = table[:n, [int(c) for c in columns]]
        self.nonempty = np.array([m.numel > 0 for m in members], dtype=bool)
        self.any_empty = not self.nonempty.all()
        # per member: its own tensors are 16-byte aligned (empty ones take no block anyway)
        self.member_aligned = ~(addresses % ALIGNMENT).any(axis=1) | ~self.nonempty
        self.static_aligned = bool((self.member_aligned & self.nonempty).any())
        self.spec = dict(
            PARAM_DTYPE=triton_dtype(dtype),
            GRAD_DTYPE=triton_dtype(members[0].flat_grad_dtype),
            STATE_DTYPE=triton_dtype(state_dtype), AMSGRAD=amsgrad,
            MASTER=KERNEL_MASTER_MODES[precision.extra],
            STOCHASTIC_ROUNDING=precision.stochastic,
            QUANT=KERNEL_QUANT_MODES[precision.codes],
            QUANT_BLOCK=precision.block_size,
        )
        self.blocks_per_tensor = -(-table[:n, int(K.COL_NUMEL)] // self.block_size)
        block_map = build_block_map(self.blocks_per_tensor)
        self.n_blocks = len(block_map)
        self.tensor_table = torch.from_numpy(table).to(device)
        self.block_map = torch.from_numpy(block_map).to(device)
        self.ranges = [BlockRange(self.block_map, self.n_blocks, False, block_map[:, 0])]
        self.aligned_pattern = None
        self.layout_version = 0  # bumped when the ranges (and so the block order) change
        self.coef_table = torch.empty((max(n, 1), int(K.COEF_WIDTH)), dtype=torch.float32,
                                      device=device)
        self.grad_table = torch.zeros(max(n, 1), dtype=torch.int64, device=device)
        self.grad_ptrs = None
        self._keep_alive = []
        self.unit_and_zero = None  # see step_amp_arguments

    def prepare(self, grads) -> None:
        """Point the grad table at this step's grads (an upload only if they moved)."""
        self.prepare_pointers(np.fromiter(map(Tensor.data_ptr, grads), dtype=np.int64,
                                          count=len(self.members)))

    def prepare_pointers(self, ptrs: np.ndarray) -> None:
        """Point the grad table at these grad addresses, in member order (an upload only if
        they moved)."""
        n = len(self.members)
        if self.any_empty:  # an empty grad's address is never read
            ptrs = np.where(self.nonempty, ptrs, 0)
        if self.grad_ptrs is None or not np.array_equal(ptrs, self.grad_ptrs):
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing() \
                    and self.grad_ptrs is not None:
                raise RuntimeError(
                    "triton-adam: grads moved to new memory during CUDA graph capture; run the "
                    "step eagerly once with the same grads (static grads) before capturing")
            upload(torch.from_numpy(ptrs), self.grad_table[:n], self._keep_alive)
            self.grad_ptrs = ptrs
            pattern = self.member_aligned & ((ptrs & (ALIGNMENT - 1)) == 0)
            if self.aligned_pattern is None or not np.array_equal(pattern,
                                                                  self.aligned_pattern):
                self._regroup(pattern)

    def _regroup(self, pattern: np.ndarray) -> None:
        """One block range for the aligned members and one for the others (either may be
        absent), each with its own block map."""
        ranges = []
        for aligned, members in ((True, np.flatnonzero(pattern)),
                                 (False, np.flatnonzero(~pattern))):
            blocks = build_block_map(self.blocks_per_tensor[members])
            if not len(blocks):
                continue
            blocks[:, 0] = members[blocks[:, 0]]  # back to bucket-wide member indices
            block_map = torch.empty(blocks.shape, dtype=torch.int32, device=self.device)
            upload(torch.from_numpy(blocks), block_map, self._keep_alive)
            ranges.append(BlockRange(block_map, len(blocks), aligned, blocks[:, 0]))
        self.ranges = ranges
        self.aligned_pattern = pattern
        self.layout_version += 1

    @property
    def block_tensor(self) -> np.ndarray:
        """Which member each program updates, over the ranges in launch order."""
        return np.concatenate([r.block_tensor for r in self.ranges] + [np.zeros(0, np.int32)])

    def max_registers(self, aligned: bool):
        """The step kernel's register ceiling (None: ptxas's choice)."""
        return step_max_registers(self.spec["QUANT"], aligned)

    @property
    def block_size(self) -> int:
        """Elements per program of the step kernel (and of the grad norm over its maps)."""
        return step_block_size(self.spec["QUANT"], self.spec["AMSGRAD"])

    def tile_size(self, aligned: bool) -> int:
        return step_tile_size(aligned, self.spec["MASTER"], self.spec["QUANT"],
                              self.spec["AMSGRAD"])

    @property
    def num_warps(self) -> int:
        return step_num_warps(self.spec["QUANT"])

    def step_amp_arguments(self, grad_scale, found_inf):
        """The step kernel's (grad_scale, found_inf). A quantised bucket's kernel always takes
        both (1 and 0 when absent): one specialisation instead of three, each as large as the
        codes make it, for two scalar loads (a unit scale skips the division)."""
        if not self.spec["QUANT"]:
            return grad_scale, found_inf
        if self.unit_and_zero is None:
            self.unit_and_zero = (torch.ones((), dtype=torch.float32, device=self.device),
                                  torch.zeros((), dtype=torch.float32, device=self.device))
        unit, zero = self.unit_and_zero
        return (unit if grad_scale is None else grad_scale,
                zero if found_inf is None else found_inf)

    def launch(self, hyper_table, grad_scale, found_inf, grad_norm):
        with on_device(self.device):
            K.launch_adam_coefficients(self.tensor_table, hyper_table, self.coef_table,
                                       found_inf, grad_norm, len(self.members))
            for r in self.ranges:
                K.launch_adam_step(
                    self.tensor_table, self.grad_table, r.block_map, self.coef_table,
                    *self.step_amp_arguments(grad_scale, found_inf), r.n_blocks,
                    dict(self.spec, ALIGNED=r.aligned), self.block_size,
                    self.tile_size(r.aligned), self.num_warps,
                    maxnreg=self.max_registers(r.aligned))


def state_key_names(amsgrad: bool):
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")


def memory_keys(amsgrad: bool, extra_key=None):
    """The state tensors a step reads and writes element by element (``extra_key``: the
    master's or compensation's, if any)."""
    return state_key_names(amsgrad) + ((extra_key,) if extra_key else ())


# a param's extra state (see _precision) -> the step kernel's MASTER constexpr
KERNEL_MASTER_MODES = {None: int(K.MASTER_NONE), "fp32": int(K.MASTER_FP32),
                       "remainder": int(K.MASTER_REMAINDER), "kahan": int(K.MASTER_KAHAN)}
# a group's code format (see _quantize) -> the step kernel's QUANT constexpr
KERNEL_QUANT_MODES = {None: int(QUANT_NONE), "int8": int(QUANT_INT8), "int4": int(QUANT_INT4),
                      "fp8": int(QUANT_FP8)}
QUANT_SCALE_COLUMNS = (K.COL_EXP_AVG_SCALE, K.COL_EXP_AVG_SQ_SCALE, K.COL_MAX_EXP_AVG_SQ_SCALE)


class StepPlan:
    """Buckets and hyperparameter tables for one arrangement of params with grads."""

    def __init__(self, optimizer, grads_by_group, states, signature):
        """``states`` maps each param with a grad to its state dict (new ones not yet stored)."""
        self.signature = signature
        groups = optimizer.param_groups
        # from every param, not only those with grads: all ranks must agree on the collectives
        self.norm_reduction = _distributed.NormReduction(
            p for group in groups for p in group["params"])
        members_by_key: dict = {}
        first_index = np.cumsum([0] + [len(g["params"]) for g in groups])
        # the params' indices in the optimizer (a compiled step's view of it lists only the
        # params with grads, and says where they sit)
        param_index = getattr(optimizer, "param_index", None)
        for gi, (group, grads) in enumerate(zip(groups, grads_by_group)):
            decoupled = bool(group.get("decoupled_weight_decay", False))
            amsgrad, maximize = bool(group["amsgrad"]), bool(group["maximize"])
            for pi, (param, grad) in enumerate(zip(group["params"], grads)):
                if grad is None:
                    continue
                backend = choose_backend(optimizer.backend, param.device, param.dtype,
                                         _validation.describe(gi, pi, param))
                if not _validation.is_dense(local(param)):
                    # a view with gaps (torch steps it): torch ops where it lies, as the
                    # kernels address each param as one run of memory
                    backend = "torch"
                state = states[param]
                precision = _precision.of(group, param, _validation.describe(gi, pi, param))
                _validation.check_state(gi, pi, param, state, amsgrad, precision)
                member = Member.of(gi, pi, param, state)
                member.segment = self.norm_reduction.segment_index(param)
                member.grad_dtype = grad.dtype
                member.precision = precision
                member.rng_tensor = (param_index[param] if param_index is not None
                                     else int(first_index[gi]) + pi)
                member.rng_offset, member.rng_shard = _distributed.random_stream(param)
                _check_state_layout(member, amsgrad)
                member.keep(("step",) + memory_keys(amsgrad, member.extra_key) + (
                    tuple(map(_quantize.scale_key, state_key_names(amsgrad)))
                    if precision.quantized else ()))
                # Hyperparameters and the decoupled/maximize flags are per tensor in the Triton
                # launch; torch's fused kernels take them per call, hence per group.
                # (a quantised group's small params, with dense moments, join its launch)
                dtypes = (member.flat_param.dtype, precision.dense_dtype, grad.dtype,
                          precision.extra, precision.stochastic, precision.codes,
                          precision.block_size)
                key = (backend, param.device, dtypes, amsgrad)
                if backend == "torch":
                    # (codes and dense moments apart: torch's fused kernel takes the latter)
                    key = key + (gi, decoupled, maximize, precision.quantized,
                                 _validation.is_dense(member.flat_param))
                members_by_key.setdefault(key, []).append(member)

        by_device: dict = {}
        for members in members_by_key.values():
            for m in members:
                by_device.setdefault(m.param.device, []).append(m)
        for members in by_device.values():
            tensors, names = [], []
            for m in members:
                keys = memory_keys("max_exp_avg_sq" in m.state, m.extra_key)
                tensors += [m.flat_param] + [m.flat(m.state[k]) for k in keys]
                names += [_validation.describe(m.group_index, m.position, m.param)] + [
                    f"state '{k}' of {_validation.describe(m.group_index, m.position, m.param)}"
                    for k in keys]
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
        self.grad_norm_runner = None
        self._state_checks = None
        self.steady = None  # what the last fully checked step saw (see _steady_step)
        self.member_devices = None
        # Every kernel this plan can launch is compiled now, before any launch: a compile
        # failure then leaves params, states and step counts untouched (see _warmup).
        compile_plan(self, optimizer)
        # where a rank with no grads this step computes (zero) norms and joins the collectives
        first = next((p for group in groups for p in group["params"]), None)
        self.device = self.members[0].param.device if self.members else (
            first.device if first is not None else torch.device("cpu"))

    def param_references(self):
        """Every reference this plan holds to a param (for the reachability check)."""
        for m in self.members:
            yield m.param
        if self._state_checks is not None:
            for param, _ in self._state_checks[0]:
                yield param

    def state_unchanged(self, optimizer) -> bool:
        """True while every member's state dict and state tensors are the ones in the tables.

        Flat identity checks, as this runs at every step for every tensor.
        """
        if self._state_checks is None:
            self._state_checks = (
                [(m.param, m.state) for m in self.members],
                [(m.state, key, tensor) for m in self.members for key, tensor, _ in
                 m.state_tensors],
                [(tensor, shard) for m in self.members for _, tensor, shard in m.state_tensors
                 if shard is not tensor])
        params, tensors, shards = self._state_checks
        get = optimizer.state.get
        return (all(get(param) is state for param, state in params)
                and all(state.get(key) is tensor for state, key, tensor in tensors)
                and all(tensor._local_tensor is shard for tensor, shard in shards))

    def run(self, optimizer, grads_by_group, grad_scale, found_inf):
        """Launch the step: check this step's grads, then (optionally) norm, then update."""
        bucket_grads = self.gather_grads(grads_by_group)
        for bucket, grads in zip(self.triton_buckets, bucket_grads):
            bucket.prepare(grads)
        self.launch(optimizer, bucket_grads, grad_scale, found_inf)
        return bucket_grads

    def gather_grads(self, grads_by_group) -> list:
        """Each bucket's grads for the kernels (triton buckets first), every one checked."""
        return [_gather_grads(b, grads_by_group)
                for b in self.triton_buckets + self.torch_buckets]

    def launch(self, optimizer, bucket_grads, grad_scale, found_inf):
        """Norm (optionally), then update, with the grad tables already pointing at
        ``bucket_grads`` (the torch buckets' grads are read from there)."""
        compile_plan(self, optimizer)  # only if max_grad_norm / skip_nonfinite were switched
        groups = optimizer.param_groups
        max_grad_norm, skip_nonfinite = optimizer.max_grad_norm, optimizer.skip_nonfinite
        grad_norm = None
        if max_grad_norm is not None or skip_nonfinite:
            grad_norm, nonfinite = self._grad_norm(bucket_grads, grad_scale, found_inf,
                                                   skip_nonfinite)
            if skip_nonfinite:
                found_inf = nonfinite
            optimizer.last_grad_norm = grad_norm
            optimizer.last_step_skipped = (nonfinite if skip_nonfinite else
                                           torch.zeros_like(nonfinite) if found_inf is None
                                           else found_inf.to(nonfinite.device)) != 0
            if max_grad_norm is None:
                grad_norm = None
        for table in self.hyper_tables.values():
            table.update(groups, max_grad_norm)
        for bucket in self.triton_buckets:
            bucket.launch(self.hyper_tables[bucket.device].table,
                          _on_device(grad_scale, bucket.device),
                          _on_device(found_inf, bucket.device),
                          _on_device(grad_norm, bucket.device))
        for bucket, grads in zip(self.torch_buckets, bucket_grads[len(self.triton_buckets):]):
            clip = None
            if grad_norm is not None:
                clip_coef = max_grad_norm / (_on_device(grad_norm, bucket.device) + 1e-6)
                clip = torch.clamp(clip_coef, max=1.0)
            bucket.launch(grads, groups[bucket.group_index],
                          _on_device(grad_scale, bucket.device),
                          _on_device(found_inf, bucket.device), clip)

    def _grad_norm(self, bucket_grads, grad_scale, found_inf, check_nonfinite):
        """Global grad 2-norm (of the unscaled grads) and non-finite flag, on the device."""
        if self.member_devices is None:  # fixed for the plan: not walked at every step
            self.member_devices = {m.param.device for m in self.members}
        devices = self.member_devices
        if len(devices) > 1:
            raise ValueError("max_grad_norm / skip_nonfinite need every param with a grad on one "
                             f"device; this step has params on {sorted(map(str, devices))}")
        if self.norm_reduction.distributed:
            return self._distributed_grad_norm(bucket_grads, grad_scale, found_inf,
                                               check_nonfinite)
        if self.torch_buckets or not self.triton_buckets:
            device = next(iter(devices)) if devices else torch.device("cpu")
            return grad_norm_and_nonfinite([g for grads in bucket_grads for g in grads],
                                           grad_scale, found_inf, device, check_nonfinite)
        if self.grad_norm_runner is None:
            self.grad_norm_runner = TritonGradNorm(self.triton_buckets)
        device = self.triton_buckets[0].device
        return self.grad_norm_runner.run(self.triton_buckets, _on_device(grad_scale, device),
                                         _on_device(found_inf, device))


    def _distributed_grad_norm(self, bucket_grads, grad_scale, found_inf, check_nonfinite):
        """The norm over every rank's shards: local per-segment totals, then the all-reduces.

        Runs on every rank at every step, also with no grads or only empty shards here, so
        that all ranks join the same collectives.
        """
        reduction = self.norm_reduction
        n_segments = len(reduction.segments)
        if self.triton_buckets and not self.torch_buckets:
            if self.grad_norm_runner is None:
                self.grad_norm_runner = TritonGradNorm(self.triton_buckets)
            versions = tuple(b.layout_version for b in self.triton_buckets)
            if getattr(self, "segment_versions", None) != versions:
                # the partials come in the buckets' block order, which follows the grads'
                # alignment pattern
                of_partial = [np.array([m.segment for m in b.members],
                                       dtype=np.int32)[b.block_tensor]
                              for b in self.triton_buckets]
                self.segment_of_partial = to_device(
                    np.concatenate(of_partial + [np.zeros(1, np.int32)]), self.device)
                self.segment_versions = versions
            totals, flag = self.grad_norm_runner.run_segments(
                self.triton_buckets, self.segment_of_partial, n_segments)
        else:
            if getattr(self, "member_segments", None) is None:
                self.member_segments = to_device(np.array(
                    [m.segment for b in self.triton_buckets + self.torch_buckets
                     for m in b.members], dtype=np.int64), self.device)
            grads = [g for grads in bucket_grads for g in grads]
            totals, flag = segment_totals(grads, self.member_segments, n_segments, self.device,
                                          check_nonfinite)
        total, flag = reduction.reduce(totals, flag, 2.0)
        norm = _distributed.finish_norm(total, 2.0, grad_scale)
        if found_inf is not None:
            flag = torch.maximum(flag, (found_inf.to(flag.device) != 0).to(torch.float32))
        return norm, flag


def _on_device(tensor, device):
    if tensor is None:
        return None
    # non_blocking only towards a GPU: a non-blocking copy to the CPU may be read before it lands
    return tensor.to(device=device, dtype=torch.float32, non_blocking=device.type == "cuda")


class GradDtypeChanged(Exception):
    """A grad's dtype is not the one the tables were built for (float32 grads of a 16-bit
    param this step, its own dtype before): raised before any launch; the step builds anew."""

    def __init__(self):
        super().__init__("triton-adam: a grad's dtype changed since the tables were built")


def _gather_grads(bucket, grads_by_group) -> list:
    """This step's grads (local shards) for the bucket's members, checked before any launch."""
    grads = []
    for member, (gi, pi) in zip(bucket.members, bucket.index):
        grad = grads_by_group[gi][pi]
        shard = _distributed.local_grad(member.param, grad, member.describe)
        if shard.dtype is not member.grad_dtype and shard.dtype in (member.dtype, torch.float32):
            _validation.check_grad(gi, pi, member.param, grad)
            raise GradDtypeChanged()  # the launch specialises on it: the step builds anew
        # get_device(): an int, far cheaper than building torch.device objects per grad
        if (shard.dtype is not member.grad_dtype or shard.layout is not torch.strided
                or shard.numel() != member.numel
                or shard.get_device() != member.flat_param.get_device()):
            _validation.check_grad(gi, pi, member.param, grad)
            raise ValueError(f"{member.describe()}: unusable grad {shard.layout}, {shard.dtype}, "
                             f"local shape {tuple(shard.shape)}, {shard.device}")
        grads.append(_kernel_grad(member, shard))
    return grads


def _kernel_grad(member: Member, grad: Tensor) -> Tensor:
    """The grad in its param's memory layout (a copy only if autograd gave it other strides)."""
    if member.dtype.is_complex and grad.is_conj():
        grad = grad.resolve_conj()  # the kernels read memory; a lazy conjugate is not in it
    if grad.stride() != member.stride and member.numel > 1:
        grad = torch.empty_like(local(member.param), dtype=grad.dtype).copy_(grad)
    return grad


def _check_state_layout(member: Member, amsgrad: bool) -> None:
    """Give loaded state tensors their param's strides (a value-preserving fix-up)."""
    if not _validation.is_dense(member.flat_param):
        return  # stepped by torch ops, whatever the states' strides (see StepPlan)
    what = _validation.describe(member.group_index, member.position, member.param)
    keys = memory_keys(amsgrad, member.extra_key)
    fmt = member.precision.format
    if fmt is not None:
        # codes were re-laid when the state was prepared (optimizer.prepared_state): a new
        # layout is a new quantisation, never done here, in a state already stored
        keys = (member.extra_key,) if member.extra_key else ()
        if not fmt.packed:
            for key in state_key_names(amsgrad):  # their blocks are the local shard's
                _distributed.check_local_layout(what, key, member.param, member.state[key])
    for key in keys:
        _distributed.check_local_layout(what, key, member.param, member.state[key])
    for key in keys:
        value = member.state[key]
        if local(value).stride() != member.stride and member.numel > 1:
            value = _distributed.zeros_like(member.param, value.dtype)
            local(value).copy_(local(member.state[key]))
            member.state[key] = value
