"""Bytes held and moved per parameter by each precision mode, from the byte model, beside the
figures the peers document.

"Held" is what the optimizer keeps besides the param and its grad (moments plus master,
remainder or compensation); "moved" is what one step reads and writes per element in a single
kernel (param read and written, grad read, every state tensor read and written). Our rows come
from ``byte_model`` and the dtypes each mode allocates; ``tests/test_memory_table.py`` checks
them against the state tensors a real optimizer creates. The peers' rows are the values their
source and documentation give (see ``../shared/precision.md`` of the project notes), not
measured here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .byte_model import adam_bytes_per_element, held_bytes_per_element

FP32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class Mode:
    """One rung of the ladder: triton-adam's options and the dtypes they give."""
    name: str
    param_dtype: torch.dtype
    options: dict
    state_dtype: object  # a torch.dtype, or a code format ("int8", "int4", "fp8")
    extra_dtype: Optional[torch.dtype]  # master / remainder / compensation
    exact: str  # what the mode guarantees about the float32 trajectory

    @property
    def held(self) -> int:
        return held_bytes_per_element(self.param_dtype, self.state_dtype,
                                      extra_dtype=self.extra_dtype)

    @property
    def moved(self) -> int:
        return adam_bytes_per_element(self.param_dtype, self.param_dtype, self.state_dtype,
                                      extra_dtype=self.extra_dtype)


MODES = [
    Mode("fp32 params (torch's AdamW)", FP32, {}, FP32, None, "torch fused AdamW, bit for bit"),
    Mode("fp32 params, bf16 states", FP32, dict(state_dtype=BF16), BF16, None,
         "moments rounded to bf16 each step (torch's CUDA fused mixed-precision path)"),
    Mode("bf16 params (pure bf16)", BF16, {}, BF16, None,
         "none: updates under half an ulp are lost"),
    Mode("bf16 + master_weights=True", BF16, dict(master_weights=True), FP32, FP32,
         "master = fp32 AdamW, bit for bit"),
    Mode("bf16 + master_weights=True, bf16 states", BF16,
         dict(master_weights=True, state_dtype=BF16), BF16, FP32,
         "fp32 master, moments rounded to bf16"),
    Mode('bf16 + master_weights="compact"', BF16, dict(master_weights="compact"), FP32,
         torch.int16, "master = fp32 AdamW, bit for bit (as True)"),
    Mode('bf16 + "compact", bf16 states', BF16,
         dict(master_weights="compact", state_dtype=BF16), BF16, torch.int16,
         "exact fp32 master, moments rounded to bf16"),
    Mode("bf16 + kahan_summation", BF16, dict(kahan_summation=True), BF16, BF16,
         "param + compensation: about 16 significant bits"),
    Mode("bf16 + stochastic_rounding", BF16, dict(stochastic_rounding=True), BF16, None,
         "unbiased in expectation"),
    Mode('fp32 params, state_dtype="int8"', FP32, dict(state_dtype="int8"), "int8", None,
         "blockwise 8-bit moments (params of >= 4096 elements)"),
    Mode('bf16 params, state_dtype="int8"', BF16, dict(state_dtype="int8"), "int8", None,
         "blockwise 8-bit moments (params of >= 4096 elements)"),
    Mode('bf16 + "compact", state_dtype="int8"', BF16,
         dict(master_weights="compact", state_dtype="int8"), "int8", torch.int16,
         "exact fp32 master, 8-bit moments"),
    Mode('fp32 params, state_dtype="fp8"', FP32, dict(state_dtype="fp8"), "fp8", None,
         "blockwise e4m3 moments (params of >= 4096 elements)"),
    Mode('fp32 params, state_dtype="int4"', FP32, dict(state_dtype="int4"), "int4", None,
         "blockwise 4-bit moments (params of >= 4096 elements)"),
    Mode('bf16 params, state_dtype="int4"', BF16, dict(state_dtype="int4"), "int4", None,
         "blockwise 4-bit moments (params of >= 4096 elements)"),
]

# (system, params, what it keeps, held B, moved B, loads a torch checkpoint)
PEERS = [
    ("torch fused AdamW", "fp32", "fp32 m, v", 8, 28, "native"),
    ("torch AdamW, bf16 states (its fused kernel refused them on torch 2.11 CUDA)",
     "fp32", "bf16 m, v", 4, 20, "native"),
    ("optimi AdamW, kahan_sum", "bf16", "bf16 m, v + bf16 Kahan buffer", 6, 18, "no"),
    ("TransformerEngine FusedAdam, fp32 master", "bf16", "fp32 m, v + fp32 master", 12, 28,
     "partial"),
    ("TE, store_param_remainders + bf16 states", "bf16", "bf16 m, v + int16 remainder", 6, 18,
     "loaders break"),
    ("torchao _AdamW, bf16_stochastic_round", "bf16", "bf16 m, v", 4, 14, "not verified"),
    ("torchao AdamW8bit", "any", "8-bit blockwise m, v (block 256)", 2.03, 10,
     "not verified"),
    ("torchao AdamW4bit", "any", "4-bit blockwise m, v (block 128)", 1.06, 8.1,
     "not verified"),
    ("bitsandbytes AdamW8bit", "any", "8-bit blockwise m, v", 2.03, 10, "no"),
    ("FlashOptim", "bf16", "int8 m, uint8 v + int8 master correction", 3.13, 12.3, "yes"),
]


def rows():
    """Our modes as (name, held B/param, moved B/param, guarantee)."""
    return [(m.name, m.held, m.moved, m.exact) for m in MODES]


def markdown() -> str:
    """Both tables as Markdown (ours from the byte model, the peers' documented values)."""
    lines = ["| triton-adam mode | held B/param | moved B/param/step | guarantee |",
             "|---|---:|---:|---|"]
    lines += [f"| {name} | {held:g} | {moved:g} | {exact} |" for name, held, moved, exact in rows()]
    lines += ["", "| peer (documented) | params | keeps | held B/param | moved B/param/step | "
                  "loads a torch checkpoint |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {name} | {params} | {keeps} | {held:g} | {moved:g} | {loads} |"
              for name, params, keeps, held, moved, loads in PEERS]
    return "\n".join(lines)
