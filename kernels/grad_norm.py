"""Multi-tensor gradient norm: a partial-reduction kernel, a finalize kernel and their launchers.

The partial kernel reads the same tables as the Adam step (``adam_step.py``): grad addresses in
``grad_table``, numel in column COL_NUMEL of ``tensor_table``, one (tensor, block) row per program
in ``block_map``. Each program writes one float32 partial (sum of |g|, of g*g, or max |g|) and one
count of non-finite elements at ``partial_offset + program``; the finalize kernel, a single
program, folds every partial in a fixed order, so the same grads always give the same bits.
"""
import triton
import triton.language as tl

from .adam_step import COL_NUMEL, TABLE_WIDTH, run_or_compile

NORM_INF = 0  # the NORM constexpr: 1, 2, or NORM_INF for max |g|
FINALIZE_BLOCK = 1024


@triton.jit
def _max_keeping_nan(a, b):
    return tl.where((a != a) | (b != b), float("nan"), tl.maximum(a, b))


@triton.jit
def _block_partial(grad_ptr, lanes, mask, NORM: tl.constexpr):
    if mask is None:
        grad = tl.load(grad_ptr + lanes).to(tl.float32)
    else:
        grad = tl.load(grad_ptr + lanes, mask=mask, other=0.0).to(tl.float32)
    magnitude = tl.abs(grad)
    is_nan = grad != grad
    nonfinite = tl.sum(((magnitude == float("inf")) | is_nan).to(tl.int32), axis=0)
    if NORM == 2:
        partial = tl.sum(grad * grad, axis=0)
    elif NORM == 1:
        partial = tl.sum(magnitude, axis=0)
    else:
        # max drops NaN; the norm of NaN grads is NaN, as torch's
        partial = tl.max(magnitude, axis=0)
        partial = tl.where(tl.sum(is_nan.to(tl.int32), axis=0) > 0, float("nan"), partial)
    return partial, nonfinite


# partial_offset is where a launch's partials start: it depends on the block ranges of the
# step, which follow the grads' alignment, so the warm-up cannot know it; not specialising on
# its value (== 1, divisible by 16) keeps one compiled kernel for every offset.
@triton.jit(do_not_specialize=["partial_offset"])
def grad_norm_partials_kernel(
    tensor_table, grad_table, block_map, partials, nonfinite_counts, partial_offset,
    GRAD_DTYPE: tl.constexpr, NORM: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_SIZE: tl.constexpr,
):
    """Reduce BLOCK_SIZE elements of one grad to a float32 partial norm and a non-finite count.

    Reads each grad element once (4 B per float32 element, 2 B for 16-bit grads); writes 8 B per
    program.
    """
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_map + pid * 2).to(tl.int64)
    block = tl.load(block_map + pid * 2 + 1).to(tl.int64)
    numel = tl.load(tensor_table + tensor * TABLE_WIDTH + COL_NUMEL)
    start = block * BLOCK_SIZE
    grad_ptr = tl.load(grad_table + tensor).to(tl.pointer_type(GRAD_DTYPE)) + start
    if ALIGNED:
        grad_ptr = tl.multiple_of(grad_ptr, 16)
    lanes = tl.arange(0, TILE_SIZE)
    total = 0.0
    nonfinite = 0
    for tile_start in range(0, BLOCK_SIZE, TILE_SIZE):
        remaining = numel - start - tile_start
        if remaining >= TILE_SIZE:
            partial, count = _block_partial(grad_ptr + tile_start, lanes, None, NORM)
        else:
            partial, count = _block_partial(grad_ptr + tile_start, lanes,
                                            lanes < remaining.to(tl.int32), NORM)
        if NORM == 0:
            total = _max_keeping_nan(total, partial)
        else:
            total = total + partial
        nonfinite = nonfinite + count
    tl.store(partials + partial_offset + pid, total)
    tl.store(nonfinite_counts + partial_offset + pid, nonfinite)


@triton.jit
def _fold_partials(partials, nonfinite_counts, segment_of_partial, n_partials, segment,
                   NORM: tl.constexpr, SEGMENTED: tl.constexpr, BLOCK: tl.constexpr):
    """Fold the partials in order (those of ``segment`` only, when SEGMENTED) into one float32
    total (sum, or max keeping NaN); also whether any partial counted a non-finite element."""
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    count = tl.zeros((BLOCK,), tl.int32)
    for start in range(0, n_partials, BLOCK):
        in_range = start + lanes < n_partials
        taken = in_range
        if SEGMENTED:
            taken = in_range & (tl.load(segment_of_partial + start + lanes, mask=in_range,
                                        other=-1) == segment)
        value = tl.load(partials + start + lanes, mask=taken, other=0.0)
        if NORM == 0:
            acc = _max_keeping_nan(acc, value)
        else:
            acc = acc + value
        # an OR of per-block flags: a sum of counts could wrap past 2**31 NaNs
        block_count = tl.load(nonfinite_counts + start + lanes, mask=in_range, other=0)
        count = tl.maximum(count, (block_count > 0).to(tl.int32))
    if NORM == 0:
        total = tl.max(acc, axis=0)
        total = tl.where(tl.sum((acc != acc).to(tl.int32), axis=0) > 0, float("nan"), total)
    else:
        total = tl.sum(acc, axis=0)
    return total, tl.max(count, axis=0) > 0


@triton.jit
def grad_norm_finalize_kernel(
    partials, nonfinite_counts, n_partials, norm_out, nonfinite_out, found_inf_ptr,
    grad_scale_ptr,
    NORM: tl.constexpr, HAS_FOUND_INF: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: fold the partials in order into the norm; flag non-finite grads.

    Writes ``norm_out`` (float32; divided by ``grad_scale`` when given, so it is the norm of the
    unscaled grads) and ``nonfinite_out`` (float32 1.0 when any grad element is NaN/inf, or when
    ``found_inf`` is set; else 0.0).
    """
    norm, any_nonfinite = _fold_partials(partials, nonfinite_counts, partials, n_partials, 0,
                                         NORM, False, BLOCK)
    if NORM == 2:
        norm = tl.sqrt_rn(norm)
    if HAS_GRAD_SCALE:
        norm = tl.div_rn(norm, tl.load(grad_scale_ptr))
    flag = any_nonfinite.to(tl.float32)
    if HAS_FOUND_INF:
        flag = tl.maximum(flag, (tl.load(found_inf_ptr) != 0).to(tl.float32))
    tl.store(norm_out, norm)
    tl.store(nonfinite_out, flag)


@triton.jit
def grad_norm_segments_kernel(
    partials, nonfinite_counts, segment_of_partial, n_partials, segment_out, nonfinite_out,
    NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ``s`` folds, in order, the partials whose segment is ``s`` into ``segment_out[s]``.

    For a distributed step: the per-segment totals (sums of g*g or |g|; the max |g| for
    NORM_INF) are all-reduced across ranks before the norm is taken, so nothing here is
    square-rooted or unscaled. Program 0 also writes ``nonfinite_out`` (float32 1.0 when any
    partial counted a NaN/inf). Reads 12 B per partial per segment.
    """
    segment = tl.program_id(0)
    total, any_nonfinite = _fold_partials(partials, nonfinite_counts, segment_of_partial,
                                          n_partials, segment, NORM, True, BLOCK)
    tl.store(segment_out + segment, total)
    if segment == 0:
        tl.store(nonfinite_out, any_nonfinite.to(tl.float32))


def launch_grad_norm_partials(tensor_table, grad_table, block_map, partials, nonfinite_counts,
                              partial_offset, n_blocks, grad_dtype, norm, aligned, block_size,
                              tile_size, num_warps, warmup=False):
    """One launch over ``n_blocks`` programs of one grad dtype (a triton dtype); with
    ``warmup``, compile only."""
    if n_blocks == 0:
        return
    run_or_compile(
        grad_norm_partials_kernel, (n_blocks,), warmup,
        tensor_table, grad_table, block_map, partials, nonfinite_counts, partial_offset,
        GRAD_DTYPE=grad_dtype, NORM=norm, ALIGNED=aligned, BLOCK_SIZE=block_size,
        TILE_SIZE=tile_size, num_warps=num_warps,
    )


def launch_grad_norm_finalize(partials, nonfinite_counts, n_partials, norm_out, nonfinite_out,
                              norm, found_inf=None, grad_scale=None, warmup=False):
    """Fold ``n_partials`` partials into ``norm_out`` and ``nonfinite_out`` (0-d float32); with
    ``warmup``, compile only."""
    run_or_compile(
        grad_norm_finalize_kernel, (1,), warmup,
        partials, nonfinite_counts, n_partials, norm_out, nonfinite_out,
        found_inf if found_inf is not None else norm_out,
        grad_scale if grad_scale is not None else norm_out,
        NORM=norm, HAS_FOUND_INF=found_inf is not None, HAS_GRAD_SCALE=grad_scale is not None,
        BLOCK=FINALIZE_BLOCK, num_warps=4,
    )


def launch_grad_norm_segments(partials, nonfinite_counts, segment_of_partial, n_partials,
                              segment_out, nonfinite_out, norm, warmup=False):
    """Fold ``n_partials`` partials into one float32 total per segment (``segment_out``); with
    ``warmup``, compile only."""
    run_or_compile(
        grad_norm_segments_kernel, (segment_out.numel(),), warmup,
        partials, nonfinite_counts, segment_of_partial, n_partials, segment_out, nonfinite_out,
        NORM=norm, BLOCK=FINALIZE_BLOCK, num_warps=4,
    )
