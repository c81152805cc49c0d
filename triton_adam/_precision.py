"""The precision ladder: how each param's float32 value is kept between steps.

A 16-bit param can carry, in its state, what its rounding loses:

==================  ======================  ======================  ======================
option              state key               extra bytes held        the float32 value is
==================  ======================  ======================  ======================
master_weights=True ``master_param`` fp32   4 per param             the master (exact)
"compact"           ``master_remainder``    2 (int16)               bf16 param bits + the
                                                                    remainder (exact)
kahan_summation     ``kahan_compensation``  2 (the param's dtype)   param + compensation
stochastic_rounding (none)                  0                       the param (rounded
                                                                    stochastically)
==================  ======================  ======================  ======================

This module validates those options per param, converts a state from one mode to another (a
checkpoint saved with one, loaded with another; an option switched mid-training), and holds the
torch-op forms of the kernels' rounding rules and random stream, which the torch fallback and
the tests use. ``state_dict()`` always writes the float32 value as a dense ``master_param``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import _distributed, _quantize, _validation
from ._distributed import local

# extra -> its state key; extra is None, "fp32", "remainder" or "kahan"
EXTRA_KEYS = {"fp32": "master_param", "remainder": "master_remainder",
              "kahan": "kahan_compensation"}
MASTER_MODES = (False, True, "compact")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class Precision:
    """How one param is stepped: its moments' dtype (for quantised moments, the dtype of
    ``exp_avg``'s codes), the extra state holding its float32 value (None, "fp32", "remainder"
    or "kahan"), whether its rounding is stochastic, and its group's code format ("int8",
    "int4", "fp8" or None: the launch it joins, also for params too small to quantise)."""
    state_dtype: torch.dtype
    extra: str | None = None
    stochastic: bool = False
    codes: str | None = None
    block: int | None = None  # the group's quant_block_size (None: the format's default)

    @property
    def extra_key(self):
        return EXTRA_KEYS.get(self.extra)

    @property
    def quantized(self) -> bool:
        """This param's moments are held as blockwise codes (see _quantize)."""
        return self.codes is not None and self.state_dtype in _quantize.CODE_DTYPES

    @property
    def format(self):
        """The _quantize.Format of this param's codes (None: dense moments)."""
        if not self.quantized:
            return None
        return _quantize.with_block(_quantize.FORMATS[self.codes], self.block)

    @property
    def block_size(self) -> int:
        """Elements per scale of the group's codes (256 without codes: unused)."""
        if self.codes is None:
            return 256
        return _quantize.with_block(_quantize.FORMATS[self.codes], self.block).block

    @property
    def dense_dtype(self) -> torch.dtype:
        """The dtype of the moments as dense tensors (float32 for quantised ones)."""
        return torch.float32 if self.quantized else self.state_dtype

    def extra_dtype(self, param_dtype: torch.dtype):
        return {"fp32": torch.float32, "remainder": torch.int16}.get(self.extra, param_dtype)


def check_options(master_weights, kahan_summation, stochastic_rounding, seed) -> None:
    """Raise ValueError for a param group's precision options that do not go together."""
    if master_weights not in MASTER_MODES or isinstance(master_weights, int) and \
            not isinstance(master_weights, bool):
        raise ValueError(f"master_weights must be False, True or 'compact', got "
                         f"{master_weights!r}")
    for name, value in (("kahan_summation", kahan_summation),
                        ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    chosen = [name for name, on in (("master_weights", master_weights),
                                    ("kahan_summation", kahan_summation),
                                    ("stochastic_rounding", stochastic_rounding)) if on]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)} cannot be combined: each is a way of keeping "
                         "what the 16-bit param's rounding loses; choose one")
    if isinstance(seed, bool) or not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")


def of(group: dict, param: Tensor, what: str = "a param") -> Precision:
    """``param``'s Precision in ``group``, or a clear error for a param its options do not
    fit (checked before anything is modified)."""
    master = group.get("master_weights", False)
    kahan = bool(group.get("kahan_summation", False))
    stochastic = bool(group.get("stochastic_rounding", False))
    dtype = param.dtype
    if master == "compact" and dtype != torch.bfloat16:
        raise TypeError(f"{what}: master_weights='compact' keeps the low half of a float32 "
                        f"master beside a bfloat16 param; this one is {dtype} (use "
                        "master_weights=True for float16 params)")
    if master and dtype not in SIXTEEN_BIT:
        raise TypeError(f"{what}: master_weights=True keeps a float32 copy of bfloat16/float16 "
                        f"params; this one is {dtype} (use master_weights=False for it)")
    if kahan and dtype not in SIXTEEN_BIT:
        raise TypeError(f"{what}: kahan_summation applies to bfloat16/float16 params; this one "
                        f"is {dtype}")
    if stochastic and dtype != torch.bfloat16:
        raise TypeError(f"{what}: stochastic_rounding applies to bfloat16 params; this one is "
                        f"{dtype}")
    extra = ("remainder" if master == "compact" else "fp32" if master else
             "kahan" if kahan else None)
    state_dtype = group.get("state_dtype")
    codes = None
    if state_dtype in _quantize.FORMATS:
        codes = state_dtype
        if dtype not in (torch.float32,) + SIXTEEN_BIT:
            raise TypeError(f"{what}: state_dtype={codes!r} applies to float32, bfloat16 and "
                            f"float16 params, not {dtype}")
        # small tensors (biases, norms) keep float32 moments, decided per param on its whole
        # numel (a DTensor's is the global one): every shard of a param is held alike, at any
        # world size, and a small shard of a large param is still quantised
        small = param.numel() < group.get("min_quantized_numel", _quantize.MIN_QUANTIZED_NUMEL)
        # a view with gaps has no run of memory for the codes' blocks to follow: dense
        # moments, stepped by torch ops (see _plan.StepPlan)
        small = small or not _validation.is_dense(local(param))
        state_dtype = torch.float32 if small else _quantize.FORMATS[codes].signed_dtype
        if not small and _quantize.FORMATS[codes].packed and _distributed.is_dtensor(param):
            # int8/fp8 codes are DTensors shaped as the param; packed ones have no such shape
            raise NotImplementedError(f"{what}: state_dtype={codes!r} for DTensor (FSDP2) "
                                      "params is not built (its codes pack two elements a byte, "
                                      "flat); use 'int8' or 'fp8'")
    if state_dtype is None:
        # a master's moments are float32 AdamW's; otherwise torch's rule, the param's dtype
        state_dtype = torch.float32 if extra in ("fp32", "remainder") else dtype
    elif dtype not in (torch.float32,) + SIXTEEN_BIT:
        raise TypeError(f"{what}: state_dtype={state_dtype} applies to float32, bfloat16 and "
                        f"float16 params, not {dtype}")
    return Precision(state_dtype, extra, stochastic, codes, group.get("quant_block_size"))


# --- the float32 value and its forms (torch ops on local shards; the kernels' rules) ---

_MASK32 = 0xFFFFFFFF


def _bits32(value: Tensor) -> Tensor:
    """float32 bits as int64 in [0, 2**32)."""
    return value.contiguous().view(torch.int32).to(torch.int64) & _MASK32


def _bf16_of_bits(high: Tensor) -> Tensor:
    """int64 in [0, 2**16) -> bfloat16 with those bits."""
    return high.to(torch.int32).to(torch.int16).view(torch.bfloat16)


def _bits16(param: Tensor) -> Tensor:
    """16-bit param bits as int64 in [0, 2**16)."""
    return param.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def rounded(value: Tensor, dtype: torch.dtype) -> Tensor:
    """float32 ``value`` rounded to nearest even in ``dtype``, as the kernels store it: a
    bfloat16 NaN is the canonical 0x7FC0 (torch's CPU cast keeps the sign and payload)."""
    out = value.to(dtype)
    if dtype == torch.bfloat16:
        out = torch.where(torch.isnan(value), _bf16_of_bits(torch.full_like(value, 0x7FC0,
                                                                            dtype=torch.int64)),
                          out)
    return out


def split_half_away(value: Tensor):
    """float32 ``value`` -> (bfloat16 rounded half away from zero, int16 remainder) such that
    ``join(high, remainder)`` gives ``value`` back exactly (NaN -> canonical NaN, remainder 0)."""
    bits = _bits32(value)
    high = ((bits + 0x8000) & _MASK32) >> 16
    nan = torch.isnan(value)
    high = torch.where(nan, torch.full_like(high, 0x7FC0), high)
    remainder = (bits - (high << 16)) & _MASK32
    remainder = torch.where(nan, torch.zeros_like(remainder), remainder)
    remainder = torch.where(remainder >= 2**31, remainder - 2**32, remainder)
    return _bf16_of_bits(high), remainder.to(torch.int16)


def join(param: Tensor, remainder: Tensor) -> Tensor:
    """The float32 master a bfloat16 param and its int16 remainder hold (the kernel's rule: a
    remainder that no master rounding to the param can have, negative at +-0 or positive at
    +-inf, is a stale one, and the param's value is taken)."""
    high = _bits16(param)
    remainder = remainder.to(torch.int64)
    bits = ((high << 16) + remainder) & _MASK32
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    magnitude = high & 0x7FFF
    stale = ((magnitude == 0) & (remainder < 0)) | ((magnitude == 0x7F80) & (remainder > 0))
    return torch.where(stale, param.float(), bits.view(torch.float32))


def rounds_to(master: Tensor, param: Tensor) -> Tensor:
    """Elementwise: ``master`` is ``param``'s, not a stale one (the kernels' rule): float16,
    the param is its rounding to nearest even; bfloat16, it lies within half an ulp of the
    param, ties included (so either rounding, nearest even or the compact form's half away
    from zero, counts): same sign and at most 2**15 float32 steps apart."""
    if param.dtype != torch.bfloat16:
        return _bits16(master.to(param.dtype)) == _bits16(param)
    master_bits, param_bits = _bits32(master), _bits16(param) << 16
    same_sign = ((master_bits ^ param_bits) >> 31) == 0
    return same_sign & (((master_bits - param_bits + 0x8000) & _MASK32) <= 0x10000)


def value_of(param: Tensor, state: dict) -> Tensor:
    """The float32 value ``state`` keeps for local ``param`` (either extra form), or the
    param's own (always a new tensor); a param written from outside since the extra was
    written wins, as in the kernels. Only a 16-bit param's state describes its value."""
    param = param.detach()
    value = param.to(torch.float32, copy=True)
    if param.dtype not in SIXTEEN_BIT:
        # a 16-bit run's master, remainder or compensation loaded for a float32 param (a run
        # resumed in float32): the param is its own value, as torch.optim, which ignores them
        return value
    master = state.get("master_param")
    if master is not None:
        master = local(master)
        return torch.where(rounds_to(master, param), master, value)
    remainder = state.get("master_remainder")
    if remainder is not None:
        return join(param, local(remainder))
    compensation = state.get("kahan_compensation")
    if compensation is not None:
        return value + local(compensation).float()
    return value


def convert(param: Tensor, state: dict, precision: Precision):
    """``state`` in ``precision``'s extra form: (new state dict or ``state`` if nothing
    changes, bfloat16 bits to write into the param or None).

    The float32 value is carried over exactly into a master or a remainder: where the param is
    not that form's rounding of it (a tie rounded the other way, a Kahan pair's sum), the param
    is rewritten to it (one ulp, once the step is sure to run).
    """
    key = precision.extra_key
    others = [k for k in EXTRA_KEYS.values() if k in state and k != key]
    if not others and (key is None or key in state):
        return state, None
    shard = local(param).detach()
    value = value_of(shard, state)
    new = {k: v for k, v in state.items() if k not in EXTRA_KEYS.values()}
    rewrite = None
    if precision.extra is not None:
        extra = _distributed.zeros_like(param, precision.extra_dtype(param.dtype))
        if precision.extra == "fp32":
            # a master must round to its param (else the kernel restarts it from the param)
            local(extra).copy_(value)
            kept = rounds_to(value, shard) | value.isnan()
            if not bool(kept.all()):
                rewrite = torch.where(kept, shard, value.to(shard.dtype))
        elif precision.extra == "remainder":
            high, remainder = split_half_away(value)
            local(extra).copy_(remainder)
            if not torch.equal(_bits16(high), _bits16(shard)):
                rewrite = high
        else:
            compensation = value - shard.float()
            compensation = torch.where(compensation.isfinite(), compensation,
                                       torch.zeros_like(compensation))
            local(extra).copy_(compensation)
        new[key] = extra
    return new, rewrite


def dense_master(param: Tensor, state: dict):
    """The float32 ``master_param`` a state_dict holds for ``param`` (a DTensor for a DTensor
    param), or None if the state keeps no exact master."""
    if "master_param" in state:
        return state["master_param"]
    if "master_remainder" not in state:
        return None
    master = _distributed.zeros_like(param.detach(), torch.float32)
    local(master).copy_(join(local(param).detach(), local(state["master_remainder"])))
    return master


# --- stochastic rounding: Philox-4x32-10 in torch ops, the stream of tl.philox ---

_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: Tensor, constant: int):
    """(high, low) 32-bit halves of ``a * constant`` (``a`` int64 in [0, 2**32))."""
    product_high = a * (constant >> 16)  # < 2**48: no int64 overflow anywhere
    product_low = a * (constant & 0xFFFF)
    high = (product_high + (product_low >> 16)) >> 16
    low = (((product_high & 0xFFFF) << 16) + product_low) & _MASK32
    return high & _MASK32, low


def philox(key0, key1, c0: Tensor, c1, c2, c3, rounds: int = 10):
    """Philox-4x32 (Salmon et al. 2011) on int64 tensors holding uint32 values, as Triton's
    ``tl.philox`` computes it with key (key0, key1) = (seed low word, seed high word)."""
    zero = torch.zeros_like(c0)
    c1, c2, c3 = (zero + c for c in (c1, c2, c3))
    key0, key1 = zero + key0, zero + key1
    for _ in range(rounds):
        high_b, low_b = _mulhilo(c2, _ROUND_B)
        high_a, low_a = _mulhilo(c0, _ROUND_A)
        c0, c1, c2, c3 = high_b ^ c1 ^ key0, low_b, high_a ^ c3 ^ key1, low_a
        key0 = (key0 + _KEY_A) & _MASK32
        key1 = (key1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def random_bits16(seed: int, step: Tensor, stream: int, offset: int, numel: int,
                  device=None) -> Tensor:
    """The kernels' 16 random bits (int64) for the ``numel`` elements of a shard whose first
    element has global index ``offset``: Philox keyed on (seed, step), one call for 8
    consecutive elements, counted by (counter low word, high word, ``stream``'s low word: the
    param's index, its high word: the shard's); element 8j + k takes the low (k even) or high
    (k odd) half of call j's word k // 2. Call j's counter is (offset + 8j) // 8 for an
    ``offset`` that is a multiple of 8 (the unsharded tensor's stream), and otherwise
    offset // 8 + j with offset % 8 in bits 60-62 (a stream of its own). On ``device``
    (default: the step's)."""
    step = step.to(torch.int64) & _MASK32
    first = ((offset & 7) << 60) + (offset >> 3)
    counters = first + torch.arange((numel + 7) // 8, dtype=torch.int64,
                                   device=device or step.device)
    words = philox(seed, step, counters & _MASK32, counters >> 32, stream & _MASK32,
                   stream >> 32)
    words = torch.stack(words, dim=1)
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=2)
    return halves.reshape(-1)[:numel]


def stochastic_round(value: Tensor, random16: Tensor) -> Tensor:
    """float32 ``value`` to bfloat16, rounded up in magnitude with probability (dropped
    bits) / 2**16 (unbiased); NaN stays NaN."""
    high = ((_bits32(value) + random16) & _MASK32) >> 16
    high = torch.where(torch.isnan(value), torch.full_like(high, 0x7FC0), high)
    return _bf16_of_bits(high)
