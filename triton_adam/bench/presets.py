"""Parameter-shape presets built from published model configs (no downloads).

Each preset is a list of ``(name, shape)`` pairs, in the order the model registers them.
The full-size presets reproduce the real parameter counts exactly (tests check GPT-2 124M and
Llama-3.2-1B); the ``*-cpu`` presets keep the same layer structure at a size a 2-core CPU steps in
milliseconds, so ``triton-adam bench`` on a laptop takes seconds.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

Shape = Tuple[int, ...]
ParamList = List[Tuple[str, Shape]]


@dataclass(frozen=True)
class Preset:
    """A named list of parameter shapes plus where it makes sense to run it."""

    name: str
    description: str
    build: Callable[[], ParamList]
    # Too big for host RAM-sized runs; the runner also checks free memory before allocating.
    gpu_only: bool = False

    def params(self) -> ParamList:
        return self.build()


def gpt2_shapes(n_layer: int, n_embd: int, vocab: int, n_ctx: int) -> ParamList:
    """GPT-2 (HF ``GPT2LMHeadModel`` naming). lm_head is tied to wte, so it adds no parameter."""
    out: ParamList = [("wte.weight", (vocab, n_embd)), ("wpe.weight", (n_ctx, n_embd))]
    for i in range(n_layer):
        h = f"h.{i}."
        out += [
            (h + "ln_1.weight", (n_embd,)),
            (h + "ln_1.bias", (n_embd,)),
            # GPT-2 uses Conv1D, whose weight is stored (in_features, out_features).
            (h + "attn.c_attn.weight", (n_embd, 3 * n_embd)),
            (h + "attn.c_attn.bias", (3 * n_embd,)),
            (h + "attn.c_proj.weight", (n_embd, n_embd)),
            (h + "attn.c_proj.bias", (n_embd,)),
            (h + "ln_2.weight", (n_embd,)),
            (h + "ln_2.bias", (n_embd,)),
            (h + "mlp.c_fc.weight", (n_embd, 4 * n_embd)),
            (h + "mlp.c_fc.bias", (4 * n_embd,)),
            (h + "mlp.c_proj.weight", (4 * n_embd, n_embd)),
            (h + "mlp.c_proj.bias", (n_embd,)),
        ]
    out += [("ln_f.weight", (n_embd,)), ("ln_f.bias", (n_embd,))]
    return out


def llama_shapes(
    hidden: int,
    intermediate: int,
    n_layer: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    vocab: int,
    tied: bool,
) -> ParamList:
    """Llama (HF ``LlamaForCausalLM`` naming): no biases, RMSNorm weights only."""
    q_out = n_heads * head_dim
    kv_out = n_kv_heads * head_dim
    out: ParamList = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(n_layer):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (q_out, hidden)),
            (p + "self_attn.k_proj.weight", (kv_out, hidden)),
            (p + "self_attn.v_proj.weight", (kv_out, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q_out)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    out.append(("model.norm.weight", (hidden,)))
    if not tied:
        out.append(("lm_head.weight", (vocab, hidden)))
    return out


def vit_shapes(
    image: int, patch: int, hidden: int, n_layer: int, mlp: int, classes: int, channels: int = 3
) -> ParamList:
    """ViT (timm ``vit_base_patch16_224`` naming): class token, learned position embedding."""
    n_tokens = (image // patch) ** 2 + 1
    out: ParamList = [
        ("cls_token", (1, 1, hidden)),
        ("pos_embed", (1, n_tokens, hidden)),
        ("patch_embed.proj.weight", (hidden, channels, patch, patch)),
        ("patch_embed.proj.bias", (hidden,)),
    ]
    for i in range(n_layer):
        b = f"blocks.{i}."
        out += [
            (b + "norm1.weight", (hidden,)),
            (b + "norm1.bias", (hidden,)),
            (b + "attn.qkv.weight", (3 * hidden, hidden)),
            (b + "attn.qkv.bias", (3 * hidden,)),
            (b + "attn.proj.weight", (hidden, hidden)),
            (b + "attn.proj.bias", (hidden,)),
            (b + "norm2.weight", (hidden,)),
            (b + "norm2.bias", (hidden,)),
            (b + "mlp.fc1.weight", (mlp, hidden)),
            (b + "mlp.fc1.bias", (mlp,)),
            (b + "mlp.fc2.weight", (hidden, mlp)),
            (b + "mlp.fc2.bias", (hidden,)),
        ]
    out += [
        ("norm.weight", (hidden,)),
        ("norm.bias", (hidden,)),
        ("head.weight", (classes, hidden)),
        ("head.bias", (classes,)),
    ]
    return out


def many_small_shapes(count: int, low: int = 1024, high: int = 16384, seed: int = 0) -> ParamList:
    """LoRA-like adapters: ``count`` tensors of ``low``..``high`` elements, fixed seed.

    Shapes alternate between A (rank x d) and B (d x rank) factors with rank 8 or 16, the way
    adapters come in pairs; d is chosen so rank*d lands in the requested element range.
    """
    rng = random.Random(seed)
    out: ParamList = []
    for i in range(count):
        rank = rng.choice((8, 16))
        d = rng.randint(math.ceil(low / rank), high // rank)
        shape = (rank, d) if i % 2 == 0 else (d, rank)
        out.append((f"adapter.{i // 2}.{'A' if i % 2 == 0 else 'B'}", shape))
    return out


def one_huge_shapes(numel: int = 2**31 + 4096) -> ParamList:
    """One flat tensor past the int32 index range, where 32-bit offsets overflow."""
    return [("huge", (numel,))]


_PRESETS: Dict[str, Preset] = {}


def _register(p: Preset) -> None:
    _PRESETS[p.name] = p


_register(Preset("gpt2-124m", "GPT-2 124M: 12 layers, 768 wide, vocab 50257, tied embeddings",
                 lambda: gpt2_shapes(12, 768, 50257, 1024)))
_register(Preset("llama-3.2-1b", "Llama-3.2-1B: 16 layers, hidden 2048, GQA 32/8, vocab 128256, tied",
                 lambda: llama_shapes(2048, 8192, 16, 32, 8, 64, 128256, tied=True)))
_register(Preset("llama-3.1-8b", "Llama-3.1-8B: 32 layers, hidden 4096, GQA 32/8, vocab 128256, untied",
                 lambda: llama_shapes(4096, 14336, 32, 32, 8, 128, 128256, tied=False),
                 gpu_only=True))
_register(Preset("vit-b16", "ViT-B/16 at 224px: 12 layers, hidden 768, MLP 3072, 1000 classes",
                 lambda: vit_shapes(224, 16, 768, 12, 3072, 1000)))
_register(Preset("many-small", "4096 LoRA-like tensors of 1k-16k elements (seed 0)",
                 lambda: many_small_shapes(4096)))
_register(Preset("one-huge", "one tensor of 2**31+4096 elements (int32 offset overflow check)",
                 one_huge_shapes, gpu_only=True))
# CPU-sized variants: same structure, small enough that one step takes milliseconds on 2 cores.
_register(Preset("gpt2-small-cpu", "GPT-2 structure, 4 layers, 256 wide, vocab 8192 (~5.3M params)",
                 lambda: gpt2_shapes(4, 256, 8192, 256)))
_register(Preset("llama-tiny-cpu", "Llama structure, 4 layers, hidden 256, GQA 8/2, vocab 8192 (~5.9M)",
                 lambda: llama_shapes(256, 1024, 4, 8, 2, 32, 8192, tied=True)))
_register(Preset("vit-tiny-cpu", "ViT structure, 4 layers, hidden 192, MLP 768, 100 classes (~2.0M)",
                 lambda: vit_shapes(224, 16, 192, 4, 768, 100)))
_register(Preset("smoke-cpu", "GPT-2 structure, 2 layers, 64 wide, vocab 512 (~0.14M): smoke tests",
                 lambda: gpt2_shapes(2, 64, 512, 64)))
_register(Preset("many-small-cpu", "512 LoRA-like tensors of 1k-16k elements (seed 0)",
                 lambda: many_small_shapes(512)))

CUDA_DEFAULT = "llama-3.2-1b"
CPU_DEFAULT = "gpt2-small-cpu"
# The presets gpu_check.sh and the GPU default report cover.
MAIN_GPU_PRESETS = ("llama-3.2-1b", "gpt2-124m", "many-small", "vit-b16", "one-huge")
CPU_PRESETS = ("gpt2-small-cpu", "llama-tiny-cpu", "vit-tiny-cpu", "many-small-cpu")


def preset_names() -> List[str]:
    """All preset names, in registration order."""
    return list(_PRESETS)


def get_preset(name: str) -> Preset:
    """Look a preset up by name; raises ``KeyError`` listing the valid names."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose from: {', '.join(_PRESETS)}") from None


def default_preset(device_type: str) -> str:
    """The embedded default: a real model on CUDA, a scaled-down one on CPU."""
    return CUDA_DEFAULT if device_type == "cuda" else CPU_DEFAULT


def numel(shape: Shape) -> int:
    return math.prod(shape)


def total_params(params: ParamList) -> int:
    """Sum of elements over a preset's shapes."""
    return sum(numel(s) for _, s in params)


def describe(params: ParamList) -> Dict[str, Optional[int]]:
    """Counts that go into reports: tensors, elements, smallest and largest tensor."""
    sizes = [numel(s) for _, s in params]
    return {
        "num_tensors": len(sizes),
        "num_params": sum(sizes),
        "min_numel": min(sizes) if sizes else None,
        "max_numel": max(sizes) if sizes else None,
    }
