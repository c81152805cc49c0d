"""Blockwise quantised moments in registers: decode a tile's codes, encode the updated values.

The step kernel (adam_step.py) calls these for a tensor whose moments are codes (the QUANT
constexpr names the format). The maps, and their torch form that the fallback and the tests use,
are described in triton_adam/_quantize.py; both compute the same bits. Per element a moment
reads and writes 1 byte of codes (int8, fp8) or half a byte (int4), and each block of
QUANT_BLOCK elements one float32 scale: its absolute maximum, found in registers (a block lies
inside one tile), so no atomics and the same bits every run.
"""
import triton
import triton.language as tl

QUANT_NONE, QUANT_INT8, QUANT_INT4, QUANT_FP8 = map(tl.constexpr, range(4))
FP8_MAX = tl.constexpr(448.0)  # float8 e4m3fn's largest finite value
FLOAT32_MIN = tl.constexpr(1.1754943508222875e-38)  # the smallest normal float32
# What an infinite moment is encoded as: the float32 under the largest one, and under the
# largest one's root (a block's top code decodes to its scale within an ulp, so not to inf)
LARGEST_MOMENT = tl.constexpr(3.4028232635611926e38)
LARGEST_ROOT = tl.constexpr(1.8446741874686296e19)
# _unit_root's smallest input, 2**-100: a root under 2**-50 rounds to code 0 in every map
UNIT_ROOT_FLOOR = tl.constexpr(7.888609052210118e-31)


@triton.jit
def _levels(QUANT: tl.constexpr, SIGNED: tl.constexpr):
    """The integer maps' largest code: 127 / 255 (int8), 7 / 15 (int4)."""
    if QUANT == QUANT_INT8:
        return 127.0 if SIGNED else 255.0
    else:
        return 7.0 if SIGNED else 15.0


@triton.jit
def _load_or_zero(ptr, mask):
    """Load, with 0 for the lanes ``mask`` leaves out (None: a full tile)."""
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0)


@triton.jit
def _block_max(x, TILE_SIZE: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    """Per QUANT_BLOCK of the tile: the maximum of ``x``."""
    return tl.max(tl.reshape(x, (TILE_SIZE // QUANT_BLOCK, QUANT_BLOCK)), axis=1)


@triton.jit
def _per_element(per_block, TILE_SIZE: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    """A value per QUANT_BLOCK, repeated over the block's elements."""
    return tl.reshape(tl.broadcast_to(tl.expand_dims(per_block, 1),
                                      (TILE_SIZE // QUANT_BLOCK, QUANT_BLOCK)), (TILE_SIZE,))


@triton.jit
def _unit_root(u):
    """The IEEE square root of ``u`` in [2**-100, 2) (of 2**-100 below it), with no branch.

    On sm_80 to sm_120 ptxas computes ``sqrt.rn`` of an input in [2**-101, 2**128) as exactly
    these operations (MUFU.RSQ, two multiplies, two FMAs) and sends the rest to a slow-path call
    behind a branch per element, which also keeps it from interleaving the elements' roots;
    the domain known, the branch goes. The interpreter's rsqrt (1 / np.sqrt in float32) gives
    the same roots: all 847,249,408 float32 in [2**-100, 2) checked. A code's root only: the
    floor makes no code differ from the exact root's.
    """
    x = tl.maximum(u, UNIT_ROOT_FLOOR)
    reciprocal_root = tl.math.rsqrt(x)
    root = x * reciprocal_root
    residual = tl.fma(-root, root, x)
    return tl.fma(residual, reciprocal_root * 0.5, root)


@triton.jit
def _fp8_value(bits):
    """float8 e4m3fn bits (as loaded, uint8) -> float32, with integer ops (portable to GPUs
    without fp8 conversions; the codes written here are never NaN)."""
    bits = bits.to(tl.uint32)
    exponent = (bits >> 3) & 0xF
    mantissa = bits & 0x7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    subnormal = mantissa.to(tl.float32) * 0.001953125  # mantissa * 2**-9, exact
    magnitude = tl.where(exponent == 0, subnormal, normal)
    return tl.where((bits & 0x80) != 0, -magnitude, magnitude)


@triton.jit
def _fp8_bits(y):
    """float32 ``y`` in [0, 448] -> its float8 e4m3fn bits (int32), rounded to nearest even as
    torch's cast does."""
    bits = y.to(tl.uint32, bitcast=True)
    # normal: round the mantissa to 3 bits on the float32 bits, then rebias 127 -> 7
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal (y < 2**-6): multiples of 2**-9, rounded by the float32 add of 2**23
    subnormal = ((y * 512.0 + 8388608.0) - 8388608.0).to(tl.uint32)
    return tl.where(y < 0.015625, subnormal, normal).to(tl.int32)


@triton.jit
def load_moment(codes_ptr, scale_ptr, offsets, mask, n_valid, SIGNED: tl.constexpr,
                QUANT: tl.constexpr, TILE_SIZE: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    """The tile's float32 moment from its codes (``offsets``: element lanes; lanes past the
    tensor read as 0) and its blocks' scales at ``scale_ptr``. SIGNED: exp_avg's map;
    otherwise a second moment's (the square of the decoded root)."""
    if QUANT == QUANT_INT4:
        # two codes a byte: element 2k in the low nibble
        byte = _load_or_zero(codes_ptr + offsets // 2, mask).to(tl.int32)
        codes = (byte >> ((offsets & 1) * 4)) & 0xF
        if SIGNED:
            codes = tl.where(codes >= 8, codes - 16, codes)
        codes = codes.to(tl.float32)
    elif QUANT == QUANT_FP8:
        codes = _fp8_value(_load_or_zero(codes_ptr + offsets, mask))
    else:
        codes = _load_or_zero(codes_ptr + offsets, mask).to(tl.float32)
    groups = tl.arange(0, TILE_SIZE // QUANT_BLOCK)
    scale = tl.load(scale_ptr + groups, mask=groups * QUANT_BLOCK < n_valid, other=0.0)
    # a block's step: one division per block, then one multiply per element
    if QUANT == QUANT_FP8:
        step = tl.div_rn(scale, FP8_MAX)
    else:
        levels = _levels(QUANT, SIGNED)
        step = tl.div_rn(scale, levels * levels)
        codes = codes * tl.abs(codes)  # exact: |code| <= 255
    value = codes * _per_element(step, TILE_SIZE, QUANT_BLOCK)
    if not SIGNED:
        value = value * value
    return value


@triton.jit
def store_moment(codes_ptr, scale_ptr, value, offsets, mask, n_valid, SIGNED: tl.constexpr,
                 QUANT: tl.constexpr, TILE_SIZE: tl.constexpr, QUANT_BLOCK: tl.constexpr):
    """Encode the tile's float32 ``value`` and store its codes and its blocks' scales (their
    absolute maximum). ``value``: exp_avg (SIGNED), or a second moment's square root (the
    update has just computed it: the codes are the root's)."""
    if mask is not None:  # lanes past the tensor take no part in their block's scale
        value = tl.where(mask, value, 0.0)
    # a NaN moment is stored as 0 (its param is NaN already) and an infinite one as the largest
    # (an infinite root as the largest root), so that its block's scale stays finite and the
    # other codes stay meaningful
    value = tl.where(value != value, 0.0, value)
    if SIGNED:
        value = tl.minimum(tl.maximum(value, -LARGEST_MOMENT), LARGEST_MOMENT)
        # below the smallest normal float32 a moment is stored as 0, so that a block's scale
        # is normal or 0 and its reciprocal finite
        x = tl.where(tl.abs(value) < FLOAT32_MIN, 0.0, value)
    else:
        # a nonzero root is at least 2**-74.5 (of the smallest float32): its scale is normal
        x = tl.minimum(value, LARGEST_ROOT)
    scale = _block_max(tl.abs(x), TILE_SIZE, QUANT_BLOCK)
    # one division per block, then one multiply per element: u = x * (1 / scale), within two
    # ulps of [-1, 1] (over 1 only for scales of 2**126 and more, whose reciprocal is
    # subnormal), which still rounds to a code in range
    reciprocal = tl.where(scale > 0, tl.div_rn(1.0, tl.where(scale > 0, scale, 1.0)), 0.0)
    u = x * _per_element(reciprocal, TILE_SIZE, QUANT_BLOCK)
    if QUANT == QUANT_FP8:
        codes = _fp8_bits(tl.abs(u) * FP8_MAX)
        if SIGNED:  # the sign bit of u, also of a -0 (as torch's cast keeps it)
            codes = codes | ((u.to(tl.uint32, bitcast=True) >> 31) << 7).to(tl.int32)
    elif SIGNED:
        magnitude = tl.floor(_unit_root(tl.abs(u)) * _levels(QUANT, SIGNED) + 0.5)
        codes = tl.where(u < 0, -magnitude, magnitude).to(tl.int32)
    else:
        codes = tl.floor(_unit_root(u) * _levels(QUANT, SIGNED) + 0.5).to(tl.int32)
    if not SIGNED:  # a nonzero second moment never decodes to zero
        codes = tl.where((x > 0) & (codes == 0), 1, codes)
    if QUANT == QUANT_INT4:
        low, high = tl.split(tl.reshape(codes & 0xF, (TILE_SIZE // 2, 2)))
        packed = low | (high << 4)
        pairs = tl.arange(0, TILE_SIZE // 2)
        if mask is None:
            tl.store(codes_ptr + pairs, packed.to(tl.uint8))
        else:
            tl.store(codes_ptr + pairs, packed.to(tl.uint8), mask=pairs * 2 < n_valid)
    else:
        tl.store(codes_ptr + offsets, codes.to(codes_ptr.dtype.element_ty), mask=mask)
    groups = tl.arange(0, TILE_SIZE // QUANT_BLOCK)
    tl.store(scale_ptr + groups, scale, mask=groups * QUANT_BLOCK < n_valid)
