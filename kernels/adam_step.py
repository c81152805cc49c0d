"""Multi-tensor Adam/AdamW step: two Triton kernels and their launchers.

One launch updates every tensor of a bucket (same device, dtypes and flags), whatever its size or
count. The host keeps four device tables per bucket (see ``triton_adam/_plan.py``):

* ``tensor_table`` int64 ``[n_tensors, TABLE_WIDTH]``: addresses of param, exp_avg, exp_avg_sq,
  max_exp_avg_sq (0 without amsgrad) and step, then numel, the param-group index, the address of
  the master's extra memory (see MASTER_* below; 0 without) and the stochastic-rounding stream's
  keys: the tensor's index in the optimizer (low word) and shard (high word), the global
  element index of its first element, and the addresses of the moments' block scales when
  they are held as codes (0 otherwise; see moment_codes.py);
* ``grad_table`` int64 ``[n_tensors]``: grad addresses, kept apart because they change every step
  under ``zero_grad(set_to_none=True)`` while everything else stays put;
* ``block_map`` int32 ``[n_blocks, 2]``: (tensor index, block index inside that tensor) per program;
* ``hyper_table`` float64 ``[n_groups, HYPER_WIDTH]``: lr, beta1, beta2, eps, weight_decay, the
  group's flags as 0/1 (decoupled_weight_decay, maximize, eps_mode "paper", bias_correction,
  weight_decay_mode "schedule"), its initial_lr, max_grad_norm (inf when not clipping) and
  stochastic-rounding seed, so groups that differ in any of them still share one launch.

``adam_coefficients_kernel`` runs first (one lane per tensor): it advances each tensor's step and
derives that tensor's scalars in float64, rounding each once to float32 as torch does with its
Python-double scalars, into ``coef_table`` float32 ``[n_tensors, COEF_WIDTH]``.
``adam_step_kernel`` then streams the elements.
"""
import triton
import triton.language as tl

from .moment_codes import QUANT_INT4, QUANT_INT8, QUANT_NONE, load_moment, store_moment

# tensor_table columns
# (tl.constexpr so that kernels may read them; int() them for torch indexing)
(COL_PARAM, COL_EXP_AVG, COL_EXP_AVG_SQ, COL_MAX_EXP_AVG_SQ, COL_STEP, COL_NUMEL, COL_GROUP,
 COL_MASTER, COL_RNG_STREAM, COL_RNG_OFFSET, COL_EXP_AVG_SCALE, COL_EXP_AVG_SQ_SCALE,
 COL_MAX_EXP_AVG_SQ_SCALE) = map(tl.constexpr, range(13))
TABLE_WIDTH = tl.constexpr(13)
# hyper_table columns
(HYP_LR, HYP_BETA1, HYP_BETA2, HYP_EPS, HYP_WEIGHT_DECAY, HYP_DECOUPLED, HYP_MAXIMIZE,
 HYP_EPS_PAPER, HYP_BIAS_CORRECTION, HYP_DECAY_SCHEDULE, HYP_INITIAL_LR,
 HYP_MAX_GRAD_NORM, HYP_SEED) = map(tl.constexpr, range(13))
HYPER_WIDTH = tl.constexpr(16)
# coef_table columns
(COEF_ONE_MINUS_BETA1, COEF_BETA2, COEF_ONE_MINUS_BETA2, COEF_EPS, COEF_NEG_STEP_SIZE,
 COEF_BC2_SQRT, COEF_PARAM_SCALE, COEF_L2, COEF_GRAD_SIGN, COEF_CLIP, COEF_STEP,
 COEF_SEED) = map(tl.constexpr, range(12))
COEF_WIDTH = tl.constexpr(12)

# How a 16-bit param's float32 value is kept (the MASTER constexpr of the step kernel):
# MASTER_NONE: the param alone; MASTER_FP32: a float32 copy (4 B more); MASTER_REMAINDER: the low
# 16 bits of a float32 master beside a bfloat16 param that holds its high half, rounded half away
# from zero so that the split is exact (2 B more); MASTER_KAHAN: a compensation in the param's
# dtype, the part of the float32 value the param's rounding lost (2 B more; not exact).
MASTER_NONE, MASTER_FP32, MASTER_REMAINDER, MASTER_KAHAN = map(tl.constexpr, range(4))

COEF_BLOCK = 128  # tensors per program of the coefficient kernel
# Elements per masked piece of a quantised kernel's partial tile (see _adam_tile): one a thread
# with 8 warps
PARTIAL_PIECE_SIZE = tl.constexpr(256)
# Steps are float32 in torch's state format, exact up to 2**24; 32 squarings cover any int32 step.
_STEP_BITS = tl.constexpr(32)


@triton.jit
def _pow_int(base, exponent, N_BITS: tl.constexpr):
    """base ** exponent (exponent an int32 tensor >= 0) by repeated squaring, in base's dtype."""
    result = tl.full(base.shape, 1.0, base.dtype)
    for bit in tl.static_range(N_BITS):
        result = tl.where(((exponent >> bit) & 1) != 0, result * base, result)
        base = base * base
    return result


@triton.jit
def adam_coefficients_kernel(
    tensor_table, hyper_table, coef_table, found_inf_ptr, grad_norm_ptr, n_tensors,
    HAS_FOUND_INF: tl.constexpr, HAS_GRAD_NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    """Advance ``step`` of each tensor and write its float32 update scalars.

    Reads per tensor 2 table entries, its group's float64 hyperparameters and its float32 step;
    writes the step (unless ``found_inf`` is set) and COEF_WIDTH float32 scalars. With
    HAS_GRAD_NORM, ``grad_norm_ptr`` holds the global grad norm and each tensor gets the clip
    factor ``min(1, max_grad_norm / (norm + 1e-6))`` of its group, computed as torch's
    clip_grad_norm_ does.
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in_range = rows < n_tensors
    rows64 = rows.to(tl.int64)
    step_ptr = tl.load(tensor_table + rows64 * TABLE_WIDTH + COL_STEP, mask=row_in_range, other=0)
    step_ptr = step_ptr.to(tl.pointer_type(tl.float32))
    group = tl.load(tensor_table + rows64 * TABLE_WIDTH + COL_GROUP, mask=row_in_range, other=0)
    hyper = hyper_table + group * HYPER_WIDTH
    lr = tl.load(hyper + HYP_LR, mask=row_in_range, other=0.0)
    beta1 = tl.load(hyper + HYP_BETA1, mask=row_in_range, other=0.0)
    beta2 = tl.load(hyper + HYP_BETA2, mask=row_in_range, other=0.0)
    eps = tl.load(hyper + HYP_EPS, mask=row_in_range, other=0.0)
    weight_decay = tl.load(hyper + HYP_WEIGHT_DECAY, mask=row_in_range, other=0.0)
    decoupled = tl.load(hyper + HYP_DECOUPLED, mask=row_in_range, other=0.0) != 0.0
    maximize = tl.load(hyper + HYP_MAXIMIZE, mask=row_in_range, other=0.0) != 0.0
    eps_paper = tl.load(hyper + HYP_EPS_PAPER, mask=row_in_range, other=0.0) != 0.0
    bias_correction = tl.load(hyper + HYP_BIAS_CORRECTION, mask=row_in_range, other=1.0) != 0.0
    decay_schedule = tl.load(hyper + HYP_DECAY_SCHEDULE, mask=row_in_range, other=0.0) != 0.0
    initial_lr = tl.load(hyper + HYP_INITIAL_LR, mask=row_in_range, other=1.0)
    max_grad_norm = tl.load(hyper + HYP_MAX_GRAD_NORM, mask=row_in_range, other=0.0)
    seed = tl.load(hyper + HYP_SEED, mask=row_in_range, other=0.0)

    step_taken = row_in_range
    if HAS_FOUND_INF:
        # A GradScaler overflow skips the whole update: the step count stays as it was.
        # (broadcast as a vector load: the interpreter cannot AND a mask with a scalar)
        found_inf = tl.load(found_inf_ptr + rows * 0)
        step_taken = step_taken & (found_inf == 0.0)
    step = tl.load(step_ptr, mask=step_taken, other=0.0) + 1.0
    tl.store(step_ptr, step, mask=step_taken)

    # float64 like torch's host-side Python scalars: 1 - beta**t cancels badly in float32.
    t = step.to(tl.int32)
    bias_correction1 = tl.where(bias_correction, 1.0 - _pow_int(beta1, t, _STEP_BITS), 1.0)
    bias_correction2 = tl.where(bias_correction, 1.0 - _pow_int(beta2, t, _STEP_BITS), 1.0)
    bias_correction1 = tl.where(step_taken, bias_correction1, 1.0)
    bc2_sqrt = tl.sqrt(bias_correction2)
    # torch: p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps). The Adam paper's efficient form:
    # p -= (lr*sqrt(bc2)/bc1) * m / (sqrt(v) + eps), eps on the uncorrected root.
    step_size = tl.where(eps_paper, lr * bc2_sqrt / bias_correction1, lr / bias_correction1)
    bc2_sqrt = tl.where(eps_paper, 1.0, bc2_sqrt)
    # AdamW scales the param by 1 - lr*wd (exactly 1 when wd is 0), or with the AdamW paper's
    # schedule multiplier by 1 - (lr/initial_lr)*wd; Adam adds wd*param to the grad.
    decay_rate = tl.where(decay_schedule, lr / initial_lr, lr)
    param_scale = tl.where(decoupled, 1.0 - decay_rate * weight_decay, 1.0)
    l2 = tl.where(decoupled, 0.0, weight_decay)
    clip = tl.full(rows.shape, 1.0, tl.float32)
    if HAS_GRAD_NORM:
        # float32, as torch.nn.utils.clip_grad_norm_ computes it; a NaN norm stays NaN.
        grad_norm = tl.load(grad_norm_ptr + rows * 0)
        clip_coef = tl.div_rn(max_grad_norm.to(tl.float32), grad_norm + 1e-6)
        clip = tl.where(clip_coef > 1.0, 1.0, clip_coef)

    coef = coef_table + rows64 * COEF_WIDTH
    tl.store(coef + COEF_ONE_MINUS_BETA1, (1.0 - beta1).to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_BETA2, beta2.to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_ONE_MINUS_BETA2, (1.0 - beta2).to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_EPS, eps.to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_NEG_STEP_SIZE, (-step_size).to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_BC2_SQRT, bc2_sqrt.to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_PARAM_SCALE, param_scale.to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_L2, l2.to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_GRAD_SIGN, tl.where(maximize, -1.0, 1.0).to(tl.float32), mask=row_in_range)
    tl.store(coef + COEF_CLIP, clip, mask=row_in_range)
    tl.store(coef + COEF_STEP, step, mask=row_in_range)
    # the seed (< 2**32) travels as the bits of a float32 slot
    seed_bits = seed.to(tl.int64).to(tl.uint32).to(tl.float32, bitcast=True)
    tl.store(coef + COEF_SEED, seed_bits, mask=row_in_range)


@triton.jit
def _rounded(value, DTYPE: tl.constexpr):
    """float32 ``value`` rounded to nearest even in DTYPE.

    bfloat16 is rounded with integer ops because Triton's interpreter truncates float32 -> bfloat16;
    this way the interpreter and the GPU write the same bits (and match torch).
    """
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(value != value, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(DTYPE)


@triton.jit
def _store_rounded(ptr, value, mask, DTYPE: tl.constexpr):
    """Store float32 ``value`` as DTYPE, rounding to nearest even."""
    tl.store(ptr, _rounded(value, DTYPE), mask=mask)


@triton.jit
def _same_bits(a, b, DTYPE: tl.constexpr):
    """Elementwise: ``a`` and ``b`` (both DTYPE) have the same bits (NaNs included)."""
    if DTYPE == tl.float32:
        return a.to(tl.int32, bitcast=True) == b.to(tl.int32, bitcast=True)
    else:
        return a.to(tl.int16, bitcast=True) == b.to(tl.int16, bitcast=True)


@triton.jit
def _load_value(stored_param, master_ptr, offsets, mask, PARAM_DTYPE: tl.constexpr,
                MASTER: tl.constexpr):
    """The float32 value a step updates: the param's, or its master's (see MASTER_*)."""
    param = stored_param.to(tl.float32)
    if MASTER == MASTER_FP32:
        master = tl.load(master_ptr + offsets, mask=mask)
        # A param written from outside the optimizer (weights loaded, an EMA swap) no longer
        # is its master's rounding: its master restarts from it instead of overwriting it.
        if PARAM_DTYPE == tl.bfloat16:
            # within half an ulp of the param, ties included (so that the compact form's
            # rounding, half away from zero, counts as the master's too), in integer ops:
            # same sign, and at most 2**15 float32 steps apart
            master_bits = master.to(tl.uint32, bitcast=True)
            param_bits = stored_param.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
            same_sign = ((master_bits ^ param_bits) >> 31) == 0
            is_master_of = same_sign & ((master_bits - param_bits + 0x8000) <= 0x10000)
        else:
            is_master_of = _same_bits(_rounded(master, PARAM_DTYPE), stored_param, PARAM_DTYPE)
        param = tl.where(is_master_of, master, param)
    elif MASTER == MASTER_REMAINDER:
        remainder = tl.load(master_ptr + offsets, mask=mask).to(tl.int32)
        high = stored_param.to(tl.uint16, bitcast=True).to(tl.uint32)
        bits = (high << 16) + remainder.to(tl.uint32, bitcast=True)  # wraps, as it should
        # Almost any (param, remainder) pair is some master whose rounding is the param, so a
        # param written from outside keeps its value (the stale remainder moves it by < half
        # an ulp); not a negative remainder at +-0 (it would wrap around to a NaN) nor a
        # positive one at +-inf (a NaN): those are stale, and the param's value is taken.
        magnitude = high & 0x7FFF
        stale = ((magnitude == 0) & (remainder < 0)) | ((magnitude == 0x7F80) & (remainder > 0))
        param = tl.where(stale, param, bits.to(tl.float32, bitcast=True))
    elif MASTER == MASTER_KAHAN:
        param = param + tl.load(master_ptr + offsets, mask=mask).to(tl.float32)
    return param


@triton.jit
def _max_keeping_nan(a, b):
    """Elementwise maximum, NaN if either is (torch.maximum's rule; the GPU's max.f32 drops a
    NaN, the interpreter keeps it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _random_bits16(rng_key, rng_stream, rng_counter, N: tl.constexpr, GROUPED: tl.constexpr):
    """16 uniform random bits (in a uint32) for each of N consecutive elements, from N / 8
    calls of Philox-4x32-10 keyed on ``rng_key`` (seed, step): 128 bits a call, 16 an element.

    Call j (counted by ``rng_counter`` + j, its high word, ``rng_stream``'s low word: the
    param's index, and its high word: the shard's) serves elements 8j to 8j + 7, element 8j + k
    taking the low (k even) or high (k odd) half of the call's word k // 2. A stream that no
    state is kept for, the same for the same keys on any device and in the torch fallback
    (``_precision.random_bits16``). GROUPED: the N / 8 calls, spread over the elements (for
    a layout of 8 consecutive elements a thread: aligned tiles); otherwise each element makes
    its eight's call itself and takes its half (the same bits; for a layout of one element a
    thread, where spreading the words would go through shared memory).
    """
    if GROUPED:
        counters = rng_counter + tl.arange(0, N // 8)
    else:
        lanes = tl.arange(0, N)
        counters = rng_counter + (lanes >> 3)
    lo = counters.to(tl.uint32)
    hi = (counters >> 32).to(tl.uint32)
    zero = lo * 0
    tensor = zero + (rng_stream & 0xFFFFFFFF).to(tl.uint32)
    shard = zero + (rng_stream >> 32).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(rng_key, lo, hi, tensor, shard)
    if GROUPED:
        # [N / 8, 2, 2, 2] in row-major order (word, half): a thread holding 8 consecutive
        # elements holds its call's 4 words, so the reshape moves nothing between threads
        words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
        halves = tl.join(words & 0xFFFF, words >> 16)
        return tl.reshape(halves, (N,))
    else:
        word_index = (lanes >> 1) & 3
        word = tl.where(word_index < 2, tl.where(word_index == 0, r0, r1),
                        tl.where(word_index == 2, r2, r3))
        return (word >> ((lanes & 1) * 16).to(tl.uint32)) & 0xFFFF


@triton.jit
def _random_stream(coef, row, start, STOCHASTIC_ROUNDING: tl.constexpr):
    """(Philox key, stream, counter of the call that serves the element at ``start``, a
    multiple of 8) of stochastic rounding for the tensor of table ``row`` and coefficients
    ``coef`` (zeros without it).

    The counter of element i of a shard whose first element has global index o is
    (o + i) // 8 when o is a multiple of 8 (a whole tensor, most dim-0 shards): every shard
    then draws what the unsharded tensor would. Otherwise it is o // 8 + i // 8 with o % 8 in
    bits 60-62, a stream of its own (counters stay below 2**60): no two elements share bits.
    """
    rng_key = 0
    rng_stream = 0
    rng_counter = start
    if STOCHASTIC_ROUNDING:
        # Philox key: the group's seed in the low word, the tensor's step in the high one
        seed = tl.load(coef + COEF_SEED).to(tl.uint32, bitcast=True).to(tl.uint64)
        step = tl.load(coef + COEF_STEP).to(tl.uint64)
        rng_key = (step << 32) | seed
        rng_stream = tl.load(row + COL_RNG_STREAM)
        offset = tl.load(row + COL_RNG_OFFSET)
        rng_counter = ((offset & 7) << 60) + (offset >> 3) + start // 8
    return rng_key, rng_stream, rng_counter


@triton.jit
def _store_value(param_ptr, master_ptr, offsets, mask, value, random16,
                 PARAM_DTYPE: tl.constexpr, MASTER: tl.constexpr,
                 STOCHASTIC_ROUNDING: tl.constexpr):
    """Write the updated float32 ``value`` back as the param (and its master's extra memory);
    ``random16``: 16 random bits per element for stochastic rounding."""
    if MASTER == MASTER_REMAINDER:
        bits = value.to(tl.uint32, bitcast=True)
        is_nan = value != value
        # half away from zero (a carry on the magnitude's bits): the remainder then lies in
        # [-2**15, 2**15), one int16, and the master is the param's bits and it, exactly
        high = tl.where(is_nan, 0x7FC0, (bits + 0x8000) >> 16)
        remainder = tl.where(is_nan, 0, bits - (high << 16)).to(tl.int32, bitcast=True)
        tl.store(master_ptr + offsets, remainder.to(tl.int16), mask=mask)
        tl.store(param_ptr + offsets, high.to(tl.uint16).to(tl.bfloat16, bitcast=True),
                 mask=mask)
    elif STOCHASTIC_ROUNDING:
        # bfloat16 params: adding 16 random bits below the kept ones rounds the magnitude up
        # with probability (dropped bits) / 2**16, so the rounded value is unbiased
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + random16) >> 16
        bits = tl.where(value != value, 0x7FC0, bits)
        tl.store(param_ptr + offsets, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True),
                 mask=mask)
    else:
        rounded = _rounded(value, PARAM_DTYPE)
        if MASTER == MASTER_FP32:
            tl.store(master_ptr + offsets, value, mask=mask)
        elif MASTER == MASTER_KAHAN:
            compensation = value - rounded.to(tl.float32)
            # inf - inf: a non-finite param carries no compensation
            compensation = tl.where(tl.abs(compensation) < float("inf"), compensation, 0.0)
            _store_rounded(master_ptr + offsets, compensation, mask, PARAM_DTYPE)
        tl.store(param_ptr + offsets, rounded, mask=mask)


@triton.jit
def _adam_block(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr, offsets,
    mask, one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, param_scale, l2,
    grad_sign, clip, grad_scale, rng_key, rng_stream, rng_counter,
    exp_avg_scale_ptr, exp_avg_sq_scale_ptr, max_exp_avg_sq_scale_ptr, n_valid,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
    QUANT: tl.constexpr, QUANT_BLOCK: tl.constexpr, TILE_SIZE: tl.constexpr,
    ALIGNED: tl.constexpr = True,
):
    """Update one block of elements; ``mask`` is None for a full block (vectorisable loads).

    The pointers already point at the block's first element (its first code and scale with
    QUANT), so ``offsets`` are int32 lanes; ``rng_counter`` is the Philox counter of that
    element's eight (for stochastic rounding, see _random_stream); ``n_valid`` the tile's
    elements that exist.
    With a MASTER the update runs on the float32 value it keeps, and the param gets its rounding.
    ALIGNED: the pointers are 16-byte aligned (the elements' layout is then 8 consecutive
    elements a thread, which the random draw follows).
    """
    random16 = 0
    if STOCHASTIC_ROUNDING and not ALIGNED:
        # drawn first, the generator's state dead before the loads and the math begin: drawn
        # last, an element's own call needed up to 180 registers with amsgrad (unaligned)
        random16 = _random_bits16(rng_key, rng_stream, rng_counter, TILE_SIZE, False)
    stored_param = tl.load(param_ptr + offsets, mask=mask)
    param = _load_value(stored_param, master_ptr, offsets, mask, PARAM_DTYPE, MASTER)
    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if QUANT == QUANT_NONE:
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask).to(tl.float32)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
    else:
        exp_avg = load_moment(exp_avg_ptr, exp_avg_scale_ptr, offsets, mask, n_valid, True,
                              QUANT, TILE_SIZE, QUANT_BLOCK)
        exp_avg_sq = load_moment(exp_avg_sq_ptr, exp_avg_sq_scale_ptr, offsets, mask, n_valid,
                                 False, QUANT, TILE_SIZE, QUANT_BLOCK)

    # The operation order follows torch's single-tensor Adam, division and square root are the
    # IEEE round-to-nearest ones (Triton's default '/' is approximate on GPUs), and the compiler
    # may not contract anything (enable_fp_fusion=False at launch).
    if HAS_GRAD_SCALE:
        # quantised launches always pass a scale (see _plan): a unit one costs no division
        if grad_scale != 1.0:
            grad = tl.div_rn(grad, grad_scale)
    grad = grad * clip  # 1.0 unless clipping: the grads are clipped here, never rewritten
    grad = grad * grad_sign  # exact: maximize negates
    param = param * param_scale
    # The fused multiply-adds are where torch's CPU kernels have them (grad.add(param, alpha),
    # lerp, addcmul), and nowhere else: float32 results then match torch's bit for bit.
    if l2 != 0.0:
        grad = tl.fma(l2, param, grad)
    # torch.lerp's two-sided formula, exact at weight 1.
    if one_minus_beta1 < 0.5:
        exp_avg = tl.fma(one_minus_beta1, grad - exp_avg, exp_avg)
    else:
        exp_avg = tl.fma(exp_avg - grad, 1.0 - one_minus_beta1, grad)
    exp_avg_sq = exp_avg_sq * beta2
    exp_avg_sq = tl.fma(one_minus_beta2 * grad, grad, exp_avg_sq)
    if AMSGRAD:
        if QUANT == QUANT_NONE:
            max_exp_avg_sq = tl.load(max_exp_avg_sq_ptr + offsets, mask=mask).to(tl.float32)
            max_exp_avg_sq = _max_keeping_nan(max_exp_avg_sq, exp_avg_sq)
            _store_rounded(max_exp_avg_sq_ptr + offsets, max_exp_avg_sq, mask, STATE_DTYPE)
        else:
            max_exp_avg_sq = load_moment(max_exp_avg_sq_ptr, max_exp_avg_sq_scale_ptr, offsets,
                                         mask, n_valid, False, QUANT, TILE_SIZE, QUANT_BLOCK)
            max_exp_avg_sq = _max_keeping_nan(max_exp_avg_sq, exp_avg_sq)
        root = tl.sqrt_rn(max_exp_avg_sq)
        if QUANT != QUANT_NONE:  # a second moment's codes are its root's
            store_moment(max_exp_avg_sq_ptr, max_exp_avg_sq_scale_ptr, root, offsets, mask,
                         n_valid, False, QUANT, TILE_SIZE, QUANT_BLOCK)
    else:
        root = tl.sqrt_rn(exp_avg_sq)
    if QUANT == QUANT_NONE:
        denom = tl.div_rn(root, bc2_sqrt) + eps
        param = param + tl.div_rn(neg_step_size * exp_avg, denom)
    else:
        # Codes are not torch's moments, so neither are the bits: the bias correction of the
        # root moves to the step and eps (the same value, one IEEE division fewer per element)
        param = param + tl.div_rn((neg_step_size * bc2_sqrt) * exp_avg,
                                  root + eps * bc2_sqrt)

    if STOCHASTIC_ROUNDING and ALIGNED:
        # drawn last, where its words replace the dead loads' registers (drawn before the
        # loads, ptxas overlapped the two and needed 102 registers, 2 programs an SM)
        random16 = _random_bits16(rng_key, rng_stream, rng_counter, TILE_SIZE, True)
    _store_value(param_ptr, master_ptr, offsets, mask, param, random16, PARAM_DTYPE, MASTER,
                 STOCHASTIC_ROUNDING)
    if QUANT == QUANT_NONE:
        _store_rounded(exp_avg_ptr + offsets, exp_avg, mask, STATE_DTYPE)
        _store_rounded(exp_avg_sq_ptr + offsets, exp_avg_sq, mask, STATE_DTYPE)
    else:
        store_moment(exp_avg_ptr, exp_avg_scale_ptr, exp_avg, offsets, mask, n_valid, True,
                     QUANT, TILE_SIZE, QUANT_BLOCK)
        if AMSGRAD:  # the update's root was max_exp_avg_sq's
            root = tl.sqrt_rn(exp_avg_sq)
        store_moment(exp_avg_sq_ptr, exp_avg_sq_scale_ptr, root, offsets, mask, n_valid, False,
                     QUANT, TILE_SIZE, QUANT_BLOCK)


@triton.jit
def _adam_tile(
    param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr, master_ptr,
    one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size, bc2_sqrt, param_scale, l2,
    grad_sign, clip, grad_scale, rng_key, rng_stream, rng_counter,
    exp_avg_scale_ptr, exp_avg_sq_scale_ptr, max_exp_avg_sq_scale_ptr, remaining,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
    QUANT: tl.constexpr, QUANT_BLOCK: tl.constexpr, TILE_SIZE: tl.constexpr,
    PIECE_SIZE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One tile of ``remaining`` (may be <= 0) elements: unmasked when it is whole; a partial
    tile in masked pieces of PIECE_SIZE elements (whole QUANT_BLOCKs)."""
    if remaining >= TILE_SIZE:
        lanes = tl.arange(0, TILE_SIZE)
        _adam_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, max_exp_avg_sq_ptr,
                    master_ptr, lanes, None, one_minus_beta1, beta2, one_minus_beta2, eps,
                    neg_step_size, bc2_sqrt, param_scale, l2, grad_sign, clip, grad_scale,
                    rng_key, rng_stream, rng_counter, exp_avg_scale_ptr, exp_avg_sq_scale_ptr,
                    max_exp_avg_sq_scale_ptr, TILE_SIZE, PARAM_DTYPE, STATE_DTYPE, AMSGRAD,
                    HAS_GRAD_SCALE, MASTER, STOCHASTIC_ROUNDING, QUANT, QUANT_BLOCK, TILE_SIZE,
                    ALIGNED)
    elif remaining > 0:
        # Masked accesses are scalar: each keeps its own address live. A whole masked tile of
        # codes made this (rare) path the kernel's largest, and ptxas sizes the registers of
        # every tile by it; in pieces it needs fewer than a full tile.
        lanes = tl.arange(0, PIECE_SIZE)
        for piece in range(0, TILE_SIZE, PIECE_SIZE):
            left = remaining - piece
            if left > 0:
                codes = _code_index(piece, QUANT)
                scales = piece // QUANT_BLOCK
                _adam_block(param_ptr + piece, grad_ptr + piece, exp_avg_ptr + codes,
                            exp_avg_sq_ptr + codes, max_exp_avg_sq_ptr + codes,
                            master_ptr + piece, lanes, lanes < left.to(tl.int32),
                            one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size,
                            bc2_sqrt, param_scale, l2, grad_sign, clip, grad_scale, rng_key,
                            rng_stream, rng_counter + piece // 8, exp_avg_scale_ptr + scales,
                            exp_avg_sq_scale_ptr + scales, max_exp_avg_sq_scale_ptr + scales,
                            left, PARAM_DTYPE, STATE_DTYPE, AMSGRAD, HAS_GRAD_SCALE, MASTER,
                            STOCHASTIC_ROUNDING, QUANT, QUANT_BLOCK, PIECE_SIZE, ALIGNED)


@triton.jit
def _code_index(elements, QUANT: tl.constexpr):
    """Where an element's code lies in its codes tensor (int4: two codes a byte)."""
    if QUANT == QUANT_INT4:
        return elements // 2
    else:
        return elements


@triton.jit
def adam_step_kernel(
    tensor_table, grad_table, block_map, coef_table, grad_scale_ptr, found_inf_ptr,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_SIZE: tl.constexpr,
    MASTER: tl.constexpr = MASTER_NONE, STOCHASTIC_ROUNDING: tl.constexpr = False,
    QUANT: tl.constexpr = QUANT_NONE, QUANT_BLOCK: tl.constexpr = 256,
):
    """Adam/AdamW on BLOCK_SIZE elements of one tensor per program, in place.

    Per element reads param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq with AMSGRAD), writes
    param, exp_avg, exp_avg_sq (and max_exp_avg_sq): 28 B for float32 AdamW, 36 B with amsgrad,
    14 B for bfloat16 params and states. The grad is not written back. MASTER reads and writes
    the master's extra memory: +8 B (MASTER_FP32), +4 B (MASTER_REMAINDER, MASTER_KAHAN).
    STOCHASTIC_ROUNDING (bfloat16 params) rounds the param stochastically; no extra bytes.
    QUANT (see moment_codes.py): the tensors whose table row has scales hold each moment as
    codes, read and written as 2 B (int8, fp8) or 1 B (int4) per element and 8 B per
    QUANT_BLOCK; the others (too small to quantise) have STATE_DTYPE moments.
    ALIGNED promises that every address in the bucket is 16-byte aligned, so full blocks load
    and store 16 bytes per instruction.
    """
    if MASTER == MASTER_FP32:
        MASTER_DTYPE: tl.constexpr = tl.float32
    elif MASTER == MASTER_REMAINDER:
        MASTER_DTYPE: tl.constexpr = tl.int16
    else:
        MASTER_DTYPE: tl.constexpr = PARAM_DTYPE
    if QUANT == QUANT_INT8:  # int8 codes of exp_avg; bytes of the rest
        SIGNED_CODE_DTYPE: tl.constexpr = tl.int8
    else:
        SIGNED_CODE_DTYPE: tl.constexpr = tl.uint8
    # a tensor's last, partial tile: whole (dense kernels) or in pieces of whole code blocks
    if QUANT == QUANT_NONE:
        PIECE_SIZE: tl.constexpr = TILE_SIZE
    elif QUANT_BLOCK > PARTIAL_PIECE_SIZE:
        PIECE_SIZE: tl.constexpr = QUANT_BLOCK
    else:
        PIECE_SIZE: tl.constexpr = PARTIAL_PIECE_SIZE
    pid = tl.program_id(0).to(tl.int64)
    tensor = tl.load(block_map + pid * 2).to(tl.int64)
    block = tl.load(block_map + pid * 2 + 1).to(tl.int64)

    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr) != 0
    if not skip:
        row = tensor_table + tensor * TABLE_WIDTH
        param_ptr = tl.load(row + COL_PARAM).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(grad_table + tensor).to(tl.pointer_type(GRAD_DTYPE))
        exp_avg_address = tl.load(row + COL_EXP_AVG)
        exp_avg_sq_address = tl.load(row + COL_EXP_AVG_SQ)
        max_exp_avg_sq_address = tl.load(row + COL_MAX_EXP_AVG_SQ)
        master_ptr = tl.load(row + COL_MASTER).to(tl.pointer_type(MASTER_DTYPE))
        numel = tl.load(row + COL_NUMEL)

        coef = coef_table + tensor * COEF_WIDTH
        one_minus_beta1 = tl.load(coef + COEF_ONE_MINUS_BETA1)
        beta2 = tl.load(coef + COEF_BETA2)
        one_minus_beta2 = tl.load(coef + COEF_ONE_MINUS_BETA2)
        eps = tl.load(coef + COEF_EPS)
        neg_step_size = tl.load(coef + COEF_NEG_STEP_SIZE)
        bc2_sqrt = tl.load(coef + COEF_BC2_SQRT)
        param_scale = tl.load(coef + COEF_PARAM_SCALE)
        l2 = tl.load(coef + COEF_L2)
        grad_sign = tl.load(coef + COEF_GRAD_SIGN)
        clip = tl.load(coef + COEF_CLIP)
        grad_scale = 1.0
        if HAS_GRAD_SCALE:
            grad_scale = tl.load(grad_scale_ptr)

        # int64 base so that tensors past 2**31 elements work; lane offsets stay int32.
        start = block * BLOCK_SIZE
        rng_key, rng_stream, rng_counter = _random_stream(coef, row, start,
                                                          STOCHASTIC_ROUNDING)
        param_ptr += start
        grad_ptr += start
        master_ptr += start
        exp_avg_ptr = exp_avg_address.to(tl.pointer_type(STATE_DTYPE)) + start
        exp_avg_sq_ptr = exp_avg_sq_address.to(tl.pointer_type(STATE_DTYPE)) + start
        max_exp_avg_sq_ptr = max_exp_avg_sq_address.to(tl.pointer_type(STATE_DTYPE)) + start
        if ALIGNED:
            param_ptr = tl.multiple_of(param_ptr, 16)
            grad_ptr = tl.multiple_of(grad_ptr, 16)
            exp_avg_ptr = tl.multiple_of(exp_avg_ptr, 16)
            exp_avg_sq_ptr = tl.multiple_of(exp_avg_sq_ptr, 16)
            max_exp_avg_sq_ptr = tl.multiple_of(max_exp_avg_sq_ptr, 16)
            master_ptr = tl.multiple_of(master_ptr, 16)
        if QUANT != QUANT_NONE:
            # a tensor's codes come with scales; one without (too small to quantise) has
            # STATE_DTYPE moments and takes the dense path in the same launch
            exp_avg_scale_address = tl.load(row + COL_EXP_AVG_SCALE)
            quantized = exp_avg_scale_address != 0
            exp_avg_scale_ptr = exp_avg_scale_address.to(tl.pointer_type(tl.float32))
            exp_avg_scale_ptr += start // QUANT_BLOCK
            exp_avg_sq_scale_ptr = tl.load(row + COL_EXP_AVG_SQ_SCALE).to(
                tl.pointer_type(tl.float32)) + start // QUANT_BLOCK
            max_exp_avg_sq_scale_ptr = tl.load(row + COL_MAX_EXP_AVG_SQ_SCALE).to(
                tl.pointer_type(tl.float32)) + start // QUANT_BLOCK
            code_start = _code_index(start, QUANT)
            exp_avg_codes = exp_avg_address.to(tl.pointer_type(SIGNED_CODE_DTYPE)) + code_start
            exp_avg_sq_codes = exp_avg_sq_address.to(tl.pointer_type(tl.uint8)) + code_start
            max_exp_avg_sq_codes = max_exp_avg_sq_address.to(
                tl.pointer_type(tl.uint8)) + code_start
            if ALIGNED:
                exp_avg_codes = tl.multiple_of(exp_avg_codes, 16)
                exp_avg_sq_codes = tl.multiple_of(exp_avg_sq_codes, 16)
                max_exp_avg_sq_codes = tl.multiple_of(max_exp_avg_sq_codes, 16)
        else:
            exp_avg_scale_ptr = coef_table  # never read
            exp_avg_sq_scale_ptr = coef_table
            max_exp_avg_sq_scale_ptr = coef_table
        # A program walks its block in tiles, smaller ones when unaligned so that scalar
        # accesses do not spill. An aligned quantised program has one tile: a loop would keep
        # its pointers and coefficients live across it (see _tables.step_block_size).
        for tile_start in range(0, BLOCK_SIZE, TILE_SIZE):
            remaining = numel - start - tile_start
            dense_tile = True
            if QUANT != QUANT_NONE:
                if quantized:
                    dense_tile = False
                    code_tile = _code_index(tile_start, QUANT)
                    scale_tile = tile_start // QUANT_BLOCK
                    _adam_tile(param_ptr + tile_start, grad_ptr + tile_start,
                               exp_avg_codes + code_tile, exp_avg_sq_codes + code_tile,
                               max_exp_avg_sq_codes + code_tile, master_ptr + tile_start,
                               one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size,
                               bc2_sqrt, param_scale, l2, grad_sign, clip, grad_scale,
                               rng_key, rng_stream, rng_counter + tile_start // 8,
                               exp_avg_scale_ptr + scale_tile, exp_avg_sq_scale_ptr + scale_tile,
                               max_exp_avg_sq_scale_ptr + scale_tile, remaining,
                               PARAM_DTYPE, STATE_DTYPE, AMSGRAD, HAS_GRAD_SCALE, MASTER,
                               STOCHASTIC_ROUNDING, QUANT, QUANT_BLOCK, TILE_SIZE, PIECE_SIZE,
                               ALIGNED)
            if dense_tile:
                _adam_tile(param_ptr + tile_start, grad_ptr + tile_start,
                           exp_avg_ptr + tile_start, exp_avg_sq_ptr + tile_start,
                           max_exp_avg_sq_ptr + tile_start, master_ptr + tile_start,
                           one_minus_beta1, beta2, one_minus_beta2, eps, neg_step_size,
                           bc2_sqrt, param_scale, l2, grad_sign, clip, grad_scale,
                           rng_key, rng_stream, rng_counter + tile_start // 8,
                           exp_avg_scale_ptr, exp_avg_sq_scale_ptr, max_exp_avg_sq_scale_ptr,
                           remaining, PARAM_DTYPE, STATE_DTYPE, AMSGRAD, HAS_GRAD_SCALE, MASTER,
                           STOCHASTIC_ROUNDING, QUANT_NONE, QUANT_BLOCK, TILE_SIZE, PIECE_SIZE,
                           ALIGNED)


def run_or_compile(kernel, grid, warmup, *args, **kwargs):
    """Launch ``kernel`` over ``grid``; with ``warmup``, only compile it and load it on the device.

    A warm-up with the launch's own arguments compiles the specialisation the launch will look up
    (constexprs, options, and the alignment and value classes of the arguments), so the launch
    then finds it compiled. Loading it checks that it fits the device (registers, shared memory).
    The interpreter has nothing to compile: its warm-up does nothing.
    """
    if not warmup:
        return kernel[grid](*args, **kwargs)
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    init_handles = getattr(compiled, "_init_handles", None)
    if init_handles is not None:
        init_handles()
    return compiled


def launch_adam_coefficients(tensor_table, hyper_table, coef_table, found_inf, grad_norm,
                             n_tensors, warmup=False):
    """Advance the steps and fill ``coef_table`` (with ``warmup``, compile only).

    ``found_inf`` (skip the step when nonzero) and ``grad_norm`` (clip against each group's
    max_grad_norm) are 0-d float32 device tensors or None.
    """
    grid = (triton.cdiv(n_tensors, COEF_BLOCK),)
    run_or_compile(
        adam_coefficients_kernel, grid, warmup, tensor_table, hyper_table, coef_table,
        found_inf if found_inf is not None else coef_table,
        grad_norm if grad_norm is not None else coef_table, n_tensors,
        HAS_FOUND_INF=found_inf is not None, HAS_GRAD_NORM=grad_norm is not None,
        BLOCK=COEF_BLOCK,
        num_warps=4,
    )


def launch_adam_step(tensor_table, grad_table, block_map, coef_table, grad_scale, found_inf,
                     n_blocks, spec, block_size, tile_size, num_warps, warmup=False,
                     maxnreg=None):
    """Launch ``adam_step_kernel`` over ``n_blocks`` programs (with ``warmup``, compile only).

    ``spec`` maps the constexpr names PARAM_DTYPE, GRAD_DTYPE, STATE_DTYPE (triton dtypes),
    AMSGRAD, ALIGNED, STOCHASTIC_ROUNDING (bools), MASTER (a MASTER_* value), QUANT (a
    moment_codes.QUANT_* value) and QUANT_BLOCK (elements per scale);
    ``grad_scale`` and ``found_inf`` are float32 device tensors or None; ``maxnreg``: a
    register ceiling per thread for ptxas (None: its own choice).
    """
    if n_blocks == 0:
        return
    run_or_compile(
        adam_step_kernel, (n_blocks,), warmup, tensor_table, grad_table, block_map, coef_table,
        grad_scale if grad_scale is not None else coef_table,
        found_inf if found_inf is not None else coef_table,
        HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
        BLOCK_SIZE=block_size, TILE_SIZE=tile_size, num_warps=num_warps,
        enable_fp_fusion=False, **({"maxnreg": maxnreg} if maxnreg else {}), **spec,
    )
