"""Blockwise quantised optimizer states: the codes, in torch ops (the kernels compute the same).

``state_dtype="int8"``, ``"int4"`` or ``"fp8"`` holds each moment (``exp_avg``, ``exp_avg_sq``
and amsgrad's ``max_exp_avg_sq``) as codes with one float32 scale per block of consecutive
elements in memory order (the block's absolute maximum, under the key ``<moment>_scale``). The
signed first moment and the non-negative second moments take different maps:

* ``exp_avg``: u = m / absmax in [-1, 1].
  int8: code = sign(u) * floor(127 * sqrt(|u|) + 1/2), decoded m = code * |code| / 127**2 *
  absmax; int4: the same with 7 levels; fp8: u * 448 rounded to nearest even in float8 e4m3fn
  (448 is its largest finite value), decoded m = fp8 / 448 * absmax. The square-root companding
  of the integer codes spends their resolution on small values (a linear int8 code would zero
  everything under absmax / 254) and keeps the sign; e4m3's exponent does that by itself.
* ``exp_avg_sq`` and ``max_exp_avg_sq``: s = sqrt(v), r = s / absmax(s).
  int8: code = floor(255 * sqrt(r) + 1/2); int4: 15 levels; fp8: r * 448 in e4m3fn. A nonzero
  v takes at least the smallest nonzero code, so that a nonzero second moment never decodes to
  zero (a zero would divide the update by eps alone; only in a block whose largest v is under
  about 3e-36 can the smallest code's square underflow float32); decoded v = (decoded s)**2.

Codes are held as param-shaped tensors (int8 and uint8 for int8; float8_e4m3fn for fp8) except
int4's, two to a byte (element 2k in the low nibble, 2k+1 in the high one; signed codes in
two's complement) in a flat uint8 tensor of ceil(numel / 2) bytes. A state's format is read
from its ``exp_avg`` dtype.

The float32 arithmetic, which the kernels repeat bit for bit: a block divides once, the
elements multiply. Encoding takes u = x * (1 / absmax) (within two ulps of [-1, 1], over it
only for scales of 2**126 and more, whose reciprocal is subnormal; the codes stay in range);
decoding takes code * |code| * (absmax / levels**2) (fp8: value * (absmax / 448)), the product
of two codes being exact. Before encoding, a NaN moment becomes 0 and an infinite one the
float32 under the largest (a second moment: its root, the float32 under the largest root, so
that the top code, decoded within an ulp of its scale, stays finite); an exp_avg below the
smallest normal float32 (1.2e-38) is stored as 0, so that every scale has a finite
reciprocal.

Measured on the experiments' char-level GPT (400 steps, float32 params): int8 final loss +0.05%
of float32 AdamW's (torchao's AdamW8bit, with the bitsandbytes dynamic map, -0.32% in the same
run). Encoding and decoding are a square root and a few multiplies (fp8: integer bit
manipulation) in registers: no table lookups.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import _distributed
from ._distributed import local

MIN_QUANTIZED_NUMEL = 4096
FP8_MAX = 448.0
FLOAT32_MIN = torch.finfo(torch.float32).tiny  # the smallest normal float32
# What an infinite moment is encoded as: the float32 under the largest one, and under the
# largest one's root (a block's top code decodes to its scale within an ulp, so not to inf)
LARGEST_MOMENT = 3.4028232635611926e38
LARGEST_ROOT = 1.8446741874686296e19


@dataclass(frozen=True)
class Format:
    """A code format: elements per scale, the signed and unsigned codes' dtypes, the integer
    maps' levels (0 for fp8), and whether codes pack two to a byte."""
    name: str
    block: int
    signed_dtype: torch.dtype
    unsigned_dtype: torch.dtype
    signed_levels: float = 0.0
    unsigned_levels: float = 0.0
    packed: bool = False


FORMATS = {
    "int8": Format("int8", 256, torch.int8, torch.uint8, 127.0, 255.0),
    "int4": Format("int4", 128, torch.uint8, torch.uint8, 7.0, 15.0, packed=True),
    "fp8": Format("fp8", 256, torch.float8_e4m3fn, torch.float8_e4m3fn),
}
# exp_avg's dtype names its format
_BY_SIGNED_DTYPE = {f.signed_dtype: f for f in FORMATS.values()}
CODE_DTYPES = tuple(_BY_SIGNED_DTYPE)
QUANT_BLOCK = FORMATS["int8"].block
MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SCALE_KEYS = tuple(f"{key}_scale" for key in MOMENT_KEYS)


def scale_key(key: str) -> str:
    return f"{key}_scale"


# the block sizes a format may take (``quant_block_size``): powers of two that divide the
# kernels' smallest tile (512 elements)
BLOCK_SIZES = (64, 128, 256, 512)


def with_block(fmt: Format, block: int | None) -> Format:
    """``fmt`` with ``block`` elements per scale (None: its default)."""
    return replace(fmt, block=block) if block and block != fmt.block else fmt


def format_of(state: dict, numel: int | None = None):
    """The Format of a state's codes, or None for dense moments. With ``numel`` (the elements
    the codes stand for), its block size too, read from the scales' count: one of
    BLOCK_SIZES gives that count (when several do, one block holds every element, and they
    all decode alike)."""
    if scale_key("exp_avg") not in state:
        return None
    fmt = _BY_SIGNED_DTYPE[state["exp_avg"].dtype]
    if numel is None:
        return fmt
    n_scales = state[scale_key("exp_avg")].numel()
    fits = [b for b in BLOCK_SIZES if -(-numel // b) == n_scales]
    return fmt if fmt.block in fits or not fits else with_block(fmt, fits[0])


def n_blocks(numel: int, fmt: Format = FORMATS["int8"]) -> int:
    return -(-numel // fmt.block)


def n_code_elements(numel: int, fmt: Format) -> int:
    """Elements of a codes tensor for ``numel`` values (bytes when packed)."""
    return -(-numel // 2) if fmt.packed else numel


def _blocks(flat: Tensor, block: int) -> Tensor:
    """``flat`` zero-padded to whole blocks, as ``[n_blocks, block]``."""
    pad = (-flat.numel()) % block
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, block)


def _sqrt(x: Tensor) -> Tensor:
    # correctly rounded float32 square root (torch's vectorised CPU sqrt is not, always)
    return x.double().sqrt().float()


def _pack(codes: Tensor) -> Tensor:
    """int64 codes in [-8, 16) (flat) -> uint8 bytes, two 4-bit codes each."""
    nibbles = torch.nn.functional.pad(codes & 0xF, (0, codes.numel() % 2)).view(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).to(torch.uint8)


def _unpack(packed: Tensor, numel: int, signed: bool) -> Tensor:
    """uint8 bytes -> ``numel`` float32 4-bit codes (two's complement when ``signed``)."""
    nibbles = torch.stack([packed.to(torch.int64) & 0xF, packed.to(torch.int64) >> 4], dim=1)
    nibbles = nibbles.flatten()[:numel]
    if signed:
        nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return nibbles.to(torch.float32)


def _to_fp8(x: Tensor) -> Tensor:
    return x.to(torch.float8_e4m3fn)  # nearest even; |x| <= 448 here, so never NaN


def _finite(x: Tensor, largest: float = LARGEST_MOMENT) -> Tensor:
    """What is encoded: a NaN moment as 0 (its param is NaN already; the block keeps its
    scale) and any beyond ``largest`` (infinite ones too) as ``largest``, so that a block's
    scale and its top code's decoded value stay finite."""
    return torch.nan_to_num(x, nan=0.0).clamp_(-largest, largest)


def _reciprocal(scale: Tensor) -> Tensor:
    """1 / scale per block (0 for an all-zero block): the encoders multiply by it."""
    nonzero = scale > 0
    return torch.where(nonzero, torch.where(nonzero, scale, 1.0).reciprocal(), 0.0)


def encode_signed(x: Tensor, fmt: Format = FORMATS["int8"]):
    """float32 ``x`` (flat) -> (codes, float32 scales [n_blocks])."""
    blocks = _blocks(_finite(x), fmt.block)
    # below the smallest normal float32 a moment is stored as 0: a block's scale is then
    # normal (or 0), and its reciprocal finite
    blocks = torch.where(blocks.abs() < FLOAT32_MIN, torch.zeros_like(blocks), blocks)
    scale = blocks.abs().amax(dim=1)
    u = blocks * _reciprocal(scale)[:, None]
    if not fmt.signed_levels:
        return _to_fp8(u * FP8_MAX).flatten()[:x.numel()], scale
    magnitude = torch.floor(_sqrt(u.abs()) * fmt.signed_levels + 0.5)
    codes = torch.where(u < 0, -magnitude, magnitude).flatten()[:x.numel()]
    if fmt.packed:
        return _pack(codes.to(torch.int64)), scale
    return codes.to(fmt.signed_dtype), scale


def _steps(scale: Tensor, levels: float) -> Tensor:
    """A block's decoding step: scale / levels**2 (integer maps) or scale / 448 (fp8), divided
    correctly rounded as the kernels do: by a 0-d tensor on the scale's device, filled there
    (a CUDA tensor divided by a Python number is multiplied by its reciprocal instead)."""
    return scale / scale.new_full((), levels * levels if levels else FP8_MAX)


def decode_signed(codes: Tensor, scale: Tensor, numel: int, fmt: Format = FORMATS["int8"]):
    """Codes (flat) and their block scales -> ``numel`` float32 values."""
    if fmt.packed:
        c = _unpack(codes, numel, signed=True)
    else:
        c = codes.to(torch.float32)
    c = _blocks(c, fmt.block)
    if fmt.signed_levels:
        c = c * c.abs()  # exact
    return (c * _steps(scale, fmt.signed_levels)[:, None]).flatten()[:numel]


def encode_unsigned(v: Tensor, fmt: Format = FORMATS["int8"]):
    """float32 ``v >= 0`` (flat) -> (codes, float32 scales [n_blocks] of sqrt(v))."""
    # the codes are the root's; an infinite root is held as the largest (that of the largest
    # float32), and a nonzero root is at least 2**-74.5, so the scale is normal or 0
    s = _blocks(_finite(_sqrt(v), LARGEST_ROOT), fmt.block).abs()  # (-0.0's root is +0 here)
    scale = s.amax(dim=1)
    r = s * _reciprocal(scale)[:, None]
    if not fmt.unsigned_levels:
        bits = _to_fp8(r * FP8_MAX).view(torch.uint8)
        bits = torch.where((s > 0) & (bits == 0), torch.ones_like(bits), bits)
        return bits.flatten()[:v.numel()].view(torch.float8_e4m3fn), scale
    codes = torch.floor(_sqrt(r) * fmt.unsigned_levels + 0.5)
    codes = torch.where((s > 0) & (codes == 0), torch.ones_like(codes), codes)
    codes = codes.flatten()[:v.numel()]
    if fmt.packed:
        return _pack(codes.to(torch.int64)), scale
    return codes.to(fmt.unsigned_dtype), scale


def decode_unsigned(codes: Tensor, scale: Tensor, numel: int, fmt: Format = FORMATS["int8"]):
    """Codes (flat) and their block scales (of sqrt(v)) -> ``numel`` float32 v."""
    c = _unpack(codes, numel, signed=False) if fmt.packed else codes.to(torch.float32)
    c = _blocks(c, fmt.block)
    if fmt.unsigned_levels:
        c = c * c  # exact
    s = c * _steps(scale, fmt.unsigned_levels)[:, None]
    return (s * s).flatten()[:numel]


# the int8 maps by their historical names
def encode_exp_avg(m: Tensor):
    return encode_signed(m)


def decode_exp_avg(codes: Tensor, scale: Tensor) -> Tensor:
    return decode_signed(codes, scale, codes.numel())


def encode_exp_avg_sq(v: Tensor):
    return encode_unsigned(v)


def decode_exp_avg_sq(codes: Tensor, scale: Tensor) -> Tensor:
    return decode_unsigned(codes, scale, codes.numel())


def _codes_like(param: Tensor, dtype: torch.dtype, fmt: Format) -> Tensor:
    if fmt.packed:
        return torch.zeros(n_code_elements(param.numel(), fmt), dtype=dtype, device=param.device)
    return torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)


def scale_keys(state: dict) -> tuple:
    """The block-scale keys ``state`` holds, in ``SCALE_KEYS`` order (none: dense moments)."""
    return tuple(key for key in SCALE_KEYS if key in state)


def is_quantized(state: dict) -> bool:
    """``state`` holds its moments as codes with block scales (a live 8-bit state or a
    compact state dict's)."""
    return bool(scale_keys(state))


def zero_state(param: Tensor, fmt: Format | str = "int8", amsgrad: bool = False) -> dict:
    """Quantised moments of zero for ``param``: codes (param-shaped and laid out as the param,
    or packed flat) and scales.

    For a DTensor param the blocks are its local shard's, in memory order (as the kernels walk
    it): the codes are DTensors with the param's placements, the scales plain local tensors
    (they describe this rank's blocks only)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    shard = local(param)
    blocks = n_blocks(shard.numel(), fmt)
    state = {}
    for key in MOMENT_KEYS[:3 if amsgrad else 2]:
        dtype = fmt.signed_dtype if key == "exp_avg" else fmt.unsigned_dtype
        state[key] = _codes_like(param, dtype, fmt)
        state[scale_key(key)] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
    return state


def _memory_order(tensor: Tensor) -> Tensor:
    """The elements as the kernels walk them: in memory order (any dense strides)."""
    order = sorted(range(tensor.dim()), key=lambda d: -tensor.stride(d))
    return tensor.permute(order).reshape(-1) if tensor.dim() else tensor.reshape(-1)


def _from_memory_order(flat: Tensor, like: Tensor) -> Tensor:
    """A tensor laid out as ``like`` whose elements, in memory order, are ``flat``."""
    out = torch.empty_like(like, dtype=flat.dtype, memory_format=torch.preserve_format)
    order = sorted(range(out.dim()), key=lambda d: -out.stride(d))
    out.permute(order).copy_(flat.view([out.shape[d] for d in order]))
    return out


def laid_out_as(tensor: Tensor, param: Tensor) -> Tensor:
    """``tensor`` (param-shaped) with ``param``'s strides: itself when it has them, else a
    copy. The codes are blocked in memory order, so dense moments laid out otherwise (a
    checkpoint saved from a param with other strides) must be re-laid before encoding."""
    if tensor.stride() == param.stride() or tensor.numel() <= 1:
        return tensor
    return torch.empty_like(param, dtype=tensor.dtype).copy_(tensor)


def quantized(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor,
              max_exp_avg_sq: Tensor | None = None, fmt: Format | str = "int8") -> dict:
    """Dense moments of ``param`` as codes and scales (a new dict); a DTensor param's local
    shards are quantised (see zero_state)."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    shard = local(param)
    out = {}
    moments = (exp_avg, exp_avg_sq) + ((max_exp_avg_sq,) if max_exp_avg_sq is not None else ())
    for key, moment in zip(MOMENT_KEYS, moments):
        encode = encode_signed if key == "exp_avg" else encode_unsigned
        values = _memory_order(laid_out_as(local(moment).float(), shard))
        codes, out[scale_key(key)] = encode(values, fmt)
        out[key] = codes if fmt.packed else _distributed.shaped_like(
            param, _from_memory_order(codes, shard))
    return out


def dense(param: Tensor, state: dict, dtype=torch.float32) -> dict:
    """``state``'s quantised moments as dense ``dtype`` tensors laid out as the param (DTensors
    with its placements for a DTensor param, decoded from the local shards)."""
    shard = local(param)
    fmt = format_of(state, shard.numel())
    out = {}
    for key in MOMENT_KEYS:
        if scale_key(key) not in state:
            continue
        decode = decode_signed if key == "exp_avg" else decode_unsigned
        codes = state[key] if fmt.packed else local(state[key])
        values = decode(codes if fmt.packed else _memory_order(codes), state[scale_key(key)],
                        shard.numel(), fmt)
        # decoded in the codes' own layout (a loaded state's may not be the param's)
        values = _from_memory_order(values, shard if fmt.packed else codes).to(dtype)
        out[key] = _distributed.shaped_like(param, laid_out_as(values, shard))
    return out


def portable_codes(param: Tensor, state: dict) -> bool:
    """Whether ``state``'s codes (if any) mean the same in any param of its shape. Param-shaped
    codes carry their layout (a param laid out otherwise re-quantises them, see ``relaid``);
    packed ones are in the param's memory order, row-major only for a contiguous param."""
    fmt = format_of(state)
    return fmt is None or not fmt.packed or local(param).is_contiguous()


def from_checkpoint(param: Tensor, state: dict) -> dict:
    """A loaded ``state`` for ``param``: packed codes, which a checkpoint holds in row-major
    order (see ``portable_codes``), decoded to dense moments where ``param``'s memory order is
    another (the next step quantises them in its order); otherwise ``state`` itself."""
    if portable_codes(param, state):
        return state
    shard = local(param)
    row_major = torch.empty(shard.shape, dtype=shard.dtype, device=state["exp_avg"].device)
    rest = {k: v for k, v in state.items() if k not in MOMENT_KEYS + SCALE_KEYS}
    return {**rest, **dense(row_major, state)}


def relaid(param: Tensor, state: dict) -> dict:
    """``state`` with param-shaped codes laid out as ``param`` (a new quantisation, in its
    memory order, where they are laid out otherwise: a new dict); otherwise ``state``."""
    fmt = format_of(state, local(param).numel())
    if fmt is None or fmt.packed or local(param).numel() <= 1 or \
            local(state["exp_avg"]).stride() == local(param).stride():
        return state
    rest = {k: v for k, v in state.items() if k not in MOMENT_KEYS + SCALE_KEYS}
    return {**rest, **quantized(param, **dense(param, state), fmt=fmt)}


def convert(param: Tensor, state: dict, quantize, dtype=None) -> dict:
    """``state`` with its moments as codes of format ``quantize`` (a name or Format; True:
    int8) or dense (``quantize`` falsy, in ``dtype``); the same dict when they already are."""
    fmt = FORMATS["int8"] if quantize is True else FORMATS.get(quantize, quantize) or None
    held = format_of(state, local(param).numel())
    if fmt == held:
        return state
    rest = {k: v for k, v in state.items() if k not in MOMENT_KEYS + SCALE_KEYS}
    moments = dense(param, state) if held is not None else {
        k: state[k] for k in MOMENT_KEYS if k in state}
    if fmt is None:
        return {**rest, **{k: v.to(dtype or torch.float32) for k, v in moments.items()}}
    return {**rest, **quantized(param, moments["exp_avg"], moments["exp_avg_sq"],
                                moments.get("max_exp_avg_sq"), fmt)}
