"""Compile every kernel a step plan can launch when the plan is built, before anything runs.

Triton compiles a specialisation the first time it is launched. Compiled there, a failure (a
Triton or GPU the kernels do not support, a kernel that does not fit the device) would stop the
step after its earlier buckets were updated, leaving params and states half-stepped. Compiling
everything while the plan is built moves any such failure before the first launch: the step then
fails with nothing modified (no param, state or step count, and no new state stored).

A warm-up calls the launchers with the launch's own tables and integer arguments (the
specialisation also depends on their alignment and values), so each later launch finds its
kernel compiled. Compiled kernels go to Triton's on-disk cache: only the first plan on a machine
pays the compile time. Under the interpreter there is nothing to compile and the warm-up costs
nothing.
"""
from __future__ import annotations

import itertools

import torch

from ._grad_norm import NORM_CODES, NormSource
from ._tables import on_device
from .kernels import adam_step as K
from .kernels import grad_norm as N

# (grad_scale given, found_inf given) as a step can receive them: neither; GradScaler's found_inf
# alone (after scaler.unscale_); both (scaler.step). grad_scale never comes alone.
AMP_MODES = ((False, False), (False, True), (True, True))


def compile_plan(plan, optimizer) -> None:
    """Compile (and load on the device) every kernel specialisation ``plan`` can launch.

    That is, per Triton bucket: the coefficient kernel with and without ``found_inf``, and the
    step kernel aligned (when the bucket's own tensors are 16-byte aligned; the grads may not be)
    and unaligned, in every AMP mode; with the optimizer's ``max_grad_norm`` or
    ``skip_nonfinite``, the grad-norm kernels. Raises whatever the compiler raises; nothing has
    been launched then. Called when the plan is built and before each step's launches: it does
    nothing unless those two options changed since the plan's last warm-up.
    """
    max_grad_norm, skip_nonfinite = optimizer.max_grad_norm, bool(optimizer.skip_nonfinite)
    options = (max_grad_norm is not None, skip_nonfinite)
    if getattr(plan, "compiled_for", None) == options:
        return
    # skip_nonfinite hands the step its own non-finite flag as found_inf, at every step
    amp_modes = [mode for mode in AMP_MODES if mode[1] or not skip_nonfinite]
    for bucket in plan.triton_buckets:
        _compile_bucket(bucket, plan.hyper_tables[bucket.device].table, amp_modes,
                        clipping=max_grad_norm is not None)
    if (max_grad_norm is not None or skip_nonfinite) and _norm_on_triton(plan):
        _compile_grad_norm(plan)
    plan.compiled_for = options


def _aligned_options(bucket):
    # The step runs the aligned kernel over the members whose tensors and this step's grads are
    # all 16-byte aligned, the unaligned one over the others; grads may move at any step.
    return (True, False) if bucket.static_aligned else (False,)


def _compile_bucket(bucket, hyper_table, amp_modes, clipping: bool) -> None:
    placeholder = torch.zeros((), dtype=torch.float32, device=bucket.device)
    grad_norm = placeholder if clipping else None
    with on_device(bucket.device):
        for has_found_inf in sorted({has_inf for _, has_inf in amp_modes}):
            K.launch_adam_coefficients(bucket.tensor_table, hyper_table, bucket.coef_table,
                                       placeholder if has_found_inf else None, grad_norm,
                                       len(bucket.members), warmup=True)
        for (has_scale, has_inf), aligned in itertools.product(amp_modes,
                                                               _aligned_options(bucket)):
            K.launch_adam_step(
                bucket.tensor_table, bucket.grad_table, bucket.block_map, bucket.coef_table,
                *bucket.step_amp_arguments(placeholder if has_scale else None,
                                           placeholder if has_inf else None),
                bucket.n_blocks, dict(bucket.spec, ALIGNED=aligned), bucket.block_size,
                bucket.tile_size(aligned), bucket.num_warps, warmup=True,
                maxnreg=bucket.max_registers(aligned))


def _norm_on_triton(plan) -> bool:
    """Whether the step's grad norm runs on the Triton reduction (as ``StepPlan._grad_norm``)."""
    devices = {bucket.device for bucket in plan.triton_buckets}
    return bool(plan.triton_buckets) and not plan.torch_buckets and len(devices) == 1


def _compile_grad_norm(plan) -> None:
    """The partial-reduction kernel per bucket, at the offsets the step uses; then the finalize
    kernel in every AMP mode (a distributed plan folds its partials per segment instead)."""
    buckets = plan.triton_buckets
    device = buckets[0].device
    n_partials = sum(bucket.n_blocks for bucket in buckets)
    partials = torch.empty(max(n_partials, 1), dtype=torch.float32, device=device)
    counts = torch.empty(max(n_partials, 1), dtype=torch.int32, device=device)
    out = torch.zeros((), dtype=torch.float32, device=device)
    code = NORM_CODES[2.0]
    with on_device(device):
        offset = 0
        for bucket in buckets:
            for aligned in _aligned_options(bucket):
                source = NormSource(bucket.tensor_table, bucket.grad_table, bucket.block_map,
                                    bucket.n_blocks, bucket.spec["GRAD_DTYPE"], aligned,
                                    bucket.block_size)
                source.launch(partials, counts, offset, code, warmup=True)
            offset += bucket.n_blocks
        if plan.norm_reduction.distributed:
            # partials folded per segment, then all-reduced (StepPlan._distributed_grad_norm)
            segments = torch.zeros(max(n_partials, 1), dtype=torch.int32, device=device)
            totals = torch.empty(len(plan.norm_reduction.segments), dtype=torch.float32,
                                 device=device)
            N.launch_grad_norm_segments(partials, counts, segments, n_partials, totals, out,
                                        code, warmup=True)
            return
        for has_scale, has_inf in AMP_MODES:
            N.launch_grad_norm_finalize(partials, counts, n_partials, out, out, code,
                                        out if has_inf else None, out if has_scale else None,
                                        warmup=True)
