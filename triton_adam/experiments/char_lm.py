"""A small GPT-style character-level language model, built from a config, and its text.

The text is generated (a seeded grammar of short English sentences), so the experiments need no
download and every machine trains on the same characters. The model is a pre-LayerNorm decoder:
token and position embeddings, ``n_layers`` blocks of causal self-attention and a GELU MLP, a final
LayerNorm and an untied output layer.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "she", "he", "the children",
             "our teacher", "a small bird", "the farmer", "his sister", "the baker"]
_VERBS = ["sees", "likes", "follows", "finds", "reads", "paints", "helps", "watches", "carries",
          "remembers", "builds", "visits"]
_OBJECTS = ["the red ball", "a small house", "the river", "an apple", "the blue sky",
            "a long book", "the green garden", "a quiet town", "the yellow door", "a warm bread",
            "the tall tree", "an old map"]
_ENDINGS = ["today", "slowly", "again", "at night", "every day", "quietly", "in the morning",
            "with care", "after school", ""]


def corpus(n_chars: int = 120_000, seed: int = 0) -> str:
    """Sentences from a fixed grammar, about ``n_chars`` characters, the same for a seed."""
    rng = random.Random(seed)
    parts, length = [], 0
    while length < n_chars:
        ending = rng.choice(_ENDINGS)
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        sentence = " ".join(words + ([ending] if ending else [])) + ". "
        sentence = sentence[0].upper() + sentence[1:]
        parts.append(sentence)
        length += len(sentence)
    return "".join(parts)


@dataclass(frozen=True)
class GPTConfig:
    """The model's sizes."""
    vocab_size: int
    context: int = 64
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: int = 4


class _Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.norm1 = nn.LayerNorm(config.d_model)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, config.mlp_ratio * config.d_model),
                                 nn.GELU(),
                                 nn.Linear(config.mlp_ratio * config.d_model, config.d_model))

    def forward(self, x):
        batch, time, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        heads = lambda t: t.view(batch, time, self.n_heads, -1).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, time, width))
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    """Decoder-only transformer over characters; ``forward(idx)`` gives logits."""

    def __init__(self, config: GPTConfig, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.token = nn.Embedding(config.vocab_size, config.d_model)
        self.position = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2's init; LayerNorm weights stay 1 and biases 0
                nn.init.normal_(p, std=0.02)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.token(idx) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class CharData:
    """The corpus as character ids, split 90/10, with seeded random windows."""

    def __init__(self, text: str, context: int):
        self.chars = sorted(set(text))
        ids = torch.tensor([self.chars.index(c) for c in text], dtype=torch.long)
        split = int(0.9 * len(ids))
        self.train, self.val = ids[:split], ids[split:]
        self.context = context

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def batch(self, split: str, batch_size: int, generator: torch.Generator):
        """(inputs, targets) of ``batch_size`` random windows of ``context`` characters."""
        ids = self.train if split == "train" else self.val
        starts = torch.randint(0, len(ids) - self.context - 1, (batch_size,),
                               generator=generator)
        x = torch.stack([ids[s:s + self.context] for s in starts.tolist()])
        y = torch.stack([ids[s + 1:s + 1 + self.context] for s in starts.tolist()])
        return x, y
