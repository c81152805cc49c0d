"""Blockwise 8-bit optimizer states: the codes, in torch ops (the kernels compute the same).

``exp_avg`` is held as int8 codes and ``exp_avg_sq`` as uint8 codes, each with one float32 scale
per block of ``QUANT_BLOCK`` consecutive elements (the block's absolute maximum):

* exp_avg: u = m / absmax in [-1, 1]; code = sign(u) * floor(127 * sqrt(|u|) + 1/2); decoded
  m = code * |code| / 127**2 * absmax. The square-root companding spends the codes' resolution
  on small values (a linear code would zero everything under absmax / 254) and keeps the sign.
* exp_avg_sq: s = sqrt(v), r = s / absmax(s); code = floor(255 * sqrt(r) + 1/2), at least 1
  where v > 0, so that a nonzero second moment never decodes to zero (a zero would divide the
  update by eps alone); decoded v = (code**2 / 255**2 * absmax(s))**2.

Measured on the experiments' char-level GPT (400 steps, float32 params): final loss +0.10% of
float32 AdamW's (torchao's AdamW8bit, with the bitsandbytes dynamic map, -0.32% in the same run).
Encoding and decoding are a square root and a few multiplies in registers: no table lookups.
"""
from __future__ import annotations

import torch
from torch import Tensor

QUANT_BLOCK = 256
MIN_QUANTIZED_NUMEL = 4096
_M_LEVELS, _V_LEVELS = 127.0, 255.0


def n_blocks(numel: int) -> int:
    return -(-numel // QUANT_BLOCK)


def _blocks(flat: Tensor) -> Tensor:
    """``flat`` zero-padded to whole blocks, as ``[n_blocks, QUANT_BLOCK]``."""
    pad = (-flat.numel()) % QUANT_BLOCK
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, QUANT_BLOCK)


def _sqrt(x: Tensor) -> Tensor:
    # correctly rounded float32 square root (torch's vectorised CPU sqrt is not, always)
    return x.double().sqrt().float()


def encode_exp_avg(m: Tensor):
    """float32 ``m`` (flat) -> (int8 codes, float32 scales [n_blocks])."""
    blocks = _blocks(m)
    scale = blocks.abs().amax(dim=1)
    u = torch.where(scale[:, None] > 0, blocks / scale[:, None], torch.zeros_like(blocks))
    magnitude = torch.floor(_sqrt(u.abs()) * _M_LEVELS + 0.5)
    codes = torch.where(u < 0, -magnitude, magnitude).flatten()[:m.numel()]
    return codes.to(torch.int8), scale


def decode_exp_avg(codes: Tensor, scale: Tensor) -> Tensor:
    """int8 codes (flat) and their block scales -> float32 m."""
    c = _blocks(codes.to(torch.float32))
    m = (c * c.abs()) / (_M_LEVELS * _M_LEVELS) * scale[:, None]
    return m.flatten()[:codes.numel()]


def encode_exp_avg_sq(v: Tensor):
    """float32 ``v >= 0`` (flat) -> (uint8 codes, float32 scales [n_blocks] of sqrt(v))."""
    s = _blocks(_sqrt(v))
    scale = s.amax(dim=1)
    r = torch.where(scale[:, None] > 0, s / scale[:, None], torch.zeros_like(s))
    codes = torch.floor(_sqrt(r) * _V_LEVELS + 0.5)
    codes = torch.where((s > 0) & (codes == 0), torch.ones_like(codes), codes)
    return codes.flatten()[:v.numel()].to(torch.uint8), scale


def decode_exp_avg_sq(codes: Tensor, scale: Tensor) -> Tensor:
    """uint8 codes (flat) and their block scales (of sqrt(v)) -> float32 v."""
    c = _blocks(codes.to(torch.float32))
    s = (c * c) / (_V_LEVELS * _V_LEVELS) * scale[:, None]
    return (s * s).flatten()[:codes.numel()]


SCALE_KEYS = ("exp_avg_scale", "exp_avg_sq_scale")


def scale_keys(state: dict) -> tuple:
    """The block-scale keys ``state`` holds, in ``SCALE_KEYS`` order (none: dense moments)."""
    return tuple(key for key in SCALE_KEYS if key in state)


def is_quantized(state: dict) -> bool:
    """``state`` holds its moments as codes with block scales (a live 8-bit state or a
    compact state dict's)."""
    return bool(scale_keys(state))


def zero_state(param: Tensor) -> dict:
    """8-bit moments of zero for ``param``: codes shaped (and laid out) as the param, scales."""
    blocks = n_blocks(param.numel())
    return {"exp_avg": torch.zeros_like(param, dtype=torch.int8,
                                        memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, dtype=torch.uint8,
                                           memory_format=torch.preserve_format),
            "exp_avg_scale": torch.zeros(blocks, dtype=torch.float32, device=param.device),
            "exp_avg_sq_scale": torch.zeros(blocks, dtype=torch.float32, device=param.device)}


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


def quantized(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> dict:
    """Dense moments of ``param`` as 8-bit codes and scales (a new dict of four tensors)."""
    m_codes, m_scale = encode_exp_avg(_memory_order(laid_out_as(exp_avg.float(), param)))
    v_codes, v_scale = encode_exp_avg_sq(_memory_order(laid_out_as(exp_avg_sq.float(), param)))
    return {"exp_avg": _from_memory_order(m_codes, param),
            "exp_avg_sq": _from_memory_order(v_codes, param),
            "exp_avg_scale": m_scale, "exp_avg_sq_scale": v_scale}


def dense(param: Tensor, state: dict, dtype=torch.float32) -> dict:
    """``state``'s 8-bit moments as dense ``dtype`` tensors laid out as the param."""
    m = decode_exp_avg(_memory_order(state["exp_avg"]), state["exp_avg_scale"])
    v = decode_exp_avg_sq(_memory_order(state["exp_avg_sq"]), state["exp_avg_sq_scale"])
    # decoded in the codes' own layout (a loaded state's may not be the param's)
    return {"exp_avg": laid_out_as(_from_memory_order(m, state["exp_avg"]).to(dtype), param),
            "exp_avg_sq": laid_out_as(_from_memory_order(v, state["exp_avg_sq"]).to(dtype),
                                      param)}


def convert(param: Tensor, state: dict, quantize: bool, dtype=None) -> dict:
    """``state`` with its moments as 8-bit codes (``quantize``) or dense (in ``dtype``); the
    same dict when they already are."""
    is_quantized = "exp_avg_scale" in state
    if quantize == is_quantized:
        return state
    rest = {k: v for k, v in state.items()
            if k not in ("exp_avg", "exp_avg_sq") + SCALE_KEYS}
    if quantize:
        return {**rest, **quantized(param, state["exp_avg"], state["exp_avg_sq"])}
    return {**rest, **dense(param, state, dtype or torch.float32)}
