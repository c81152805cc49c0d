"""The optimizers the benchmark compares, each behind one small adapter.

A provider knows how to import its library, whether it supports a case (device, dtype, amsgrad,
Adam vs AdamW), how to build an optimizer over a list of params, and how its bytes/step are
counted: ``"model"`` uses the explicit byte model with the state dtype the optimizer actually
allocated; ``"state"`` counts the optimizer's own state tensors (8-bit and compressed states,
per-block scales included). Import failures are reported with the exception text, never hidden.

With ``OptimConfig.max_grad_norm`` set, the timed step is "clip + step": triton-adam gets
``max_grad_norm=`` (the clip is fused into its step); every other provider runs
``torch.nn.utils.clip_grad_norm_`` (torch's default foreach choice) and then its own step,
which is what a training loop using it does.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch


@dataclass(frozen=True)
class OptimConfig:
    """Hyper-parameters shared by every provider in a run."""

    kind: str = "adamw"  # "adam" (L2 penalty) or "adamw" (decoupled decay)
    amsgrad: bool = False
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: Optional[float] = None  # clip the grads' global 2-norm in every step


Factory = Callable[[Sequence[torch.Tensor], OptimConfig], torch.optim.Optimizer]


@dataclass(frozen=True)
class Provider:
    """One optimizer implementation under test."""

    name: str
    description: str
    load: Callable[[OptimConfig], Factory]  # imports the library; raises if unavailable
    bytes_source: str = "model"  # "model" or "state", see module docstring
    cuda_only: bool = False
    supports_amsgrad: bool = True
    supports_adam: bool = True  # False: AdamW only
    fused_clip: bool = False  # clips inside its own step (max_grad_norm=); else torch clips first

    def unsupported_reason(self, device: torch.device, cfg: OptimConfig) -> Optional[str]:
        """Why this provider cannot run the case, or None if it can."""
        if self.cuda_only and device.type != "cuda":
            return "needs a CUDA device"
        if cfg.amsgrad and not self.supports_amsgrad:
            return "no amsgrad support"
        if cfg.kind == "adam" and not self.supports_adam:
            return "AdamW only"
        return None


def _common(cfg: OptimConfig) -> Dict[str, Any]:
    return dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _load_triton_adam(cfg: OptimConfig) -> Factory:
    import triton_adam

    cls = triton_adam.AdamW if cfg.kind == "adamw" else triton_adam.Adam
    return lambda params, c: cls(params, amsgrad=c.amsgrad, backend="auto",
                                 max_grad_norm=c.max_grad_norm, **_common(c))


def _torch_loader(**flags: Any) -> Callable[[OptimConfig], Factory]:
    def load(cfg: OptimConfig) -> Factory:
        cls = torch.optim.AdamW if cfg.kind == "adamw" else torch.optim.Adam
        return lambda params, c: cls(params, amsgrad=c.amsgrad, **flags, **_common(c))

    return load


def _load_apex(cfg: OptimConfig) -> Factory:
    from apex.optimizers import FusedAdam

    return lambda params, c: FusedAdam(params, adam_w_mode=(c.kind == "adamw"), **_common(c))


def _load_te(cfg: OptimConfig) -> Factory:
    from transformer_engine.pytorch.optimizers import FusedAdam

    return lambda params, c: FusedAdam(params, adam_w_mode=(c.kind == "adamw"), **_common(c))


def _load_optimi(cfg: OptimConfig) -> Factory:
    import optimi

    cls = optimi.AdamW if cfg.kind == "adamw" else optimi.Adam
    # Kahan summation adds a buffer for low-precision params; off, so bytes compare like for like.
    return lambda params, c: cls(params, kahan_sum=False, **_common(c))


def _load_flashoptim(cfg: OptimConfig) -> Factory:
    import flashoptim

    cls = flashoptim.FlashAdamW if cfg.kind == "adamw" else flashoptim.FlashAdam
    return lambda params, c: cls(params, **_common(c))


def _load_heavyball(cfg: OptimConfig) -> Factory:
    from heavyball import ForeachAdamW

    return lambda params, c: ForeachAdamW(params, **_common(c))


def _load_torchao(cfg: OptimConfig) -> Factory:
    try:
        mod = importlib.import_module("torchao.optim")
    except ImportError:
        mod = importlib.import_module("torchao.prototype.low_bit_optim")
    cls = mod.AdamW8bit if cfg.kind == "adamw" else mod.Adam8bit
    return lambda params, c: cls(params, amsgrad=c.amsgrad, **_common(c))


def _load_bnb(cfg: OptimConfig) -> Factory:
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.kind == "adamw" else bnb.optim.Adam8bit
    return lambda params, c: cls(params, **_common(c))


PROVIDERS: List[Provider] = [
    Provider("triton-adam", "triton_adam.AdamW/Adam, backend='auto'", _load_triton_adam,
             fused_clip=True),
    Provider("forloop", "torch.optim, foreach=False", _torch_loader(foreach=False)),
    Provider("foreach", "torch.optim, foreach=True", _torch_loader(foreach=True)),
    Provider("fused", "torch.optim, fused=True", _torch_loader(fused=True)),
    Provider("apex", "apex.optimizers.FusedAdam", _load_apex, cuda_only=True, supports_amsgrad=False),
    Provider("transformer-engine", "transformer_engine FusedAdam", _load_te, cuda_only=True,
             supports_amsgrad=False),
    Provider("optimi", "torch-optimi AdamW (kahan_sum=False)", _load_optimi, supports_amsgrad=False),
    Provider("flashoptim", "flashoptim FlashAdamW (compressed states)", _load_flashoptim,
             bytes_source="state", cuda_only=True, supports_amsgrad=False),
    Provider("heavyball", "heavyball ForeachAdamW", _load_heavyball, bytes_source="state",
             supports_amsgrad=False, supports_adam=False),
    Provider("torchao-8bit", "torchao AdamW8bit (blockwise 8-bit states)", _load_torchao,
             bytes_source="state", cuda_only=True),
    Provider("bnb-8bit", "bitsandbytes AdamW8bit (blockwise 8-bit states)", _load_bnb,
             bytes_source="state", cuda_only=True, supports_amsgrad=False),
]

BY_NAME: Dict[str, Provider] = {p.name: p for p in PROVIDERS}


def provider_names() -> List[str]:
    """Names accepted by ``--providers``, in report order."""
    return [p.name for p in PROVIDERS]


def select(names: Optional[Sequence[str]]) -> List[Provider]:
    """The providers named (all when None), in report order; unknown names raise ValueError."""
    if not names:
        return list(PROVIDERS)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from: {', '.join(BY_NAME)}")
    wanted = set(names)
    return [p for p in PROVIDERS if p.name in wanted]


def clip_mode(provider: Provider, cfg: OptimConfig) -> Optional[str]:
    """How the timed step clips: None (no clipping), "fused" or "clip_grad_norm_" (torch's)."""
    if cfg.max_grad_norm is None:
        return None
    return "fused" if provider.fused_clip else "clip_grad_norm_"


def make_step(
    provider: Provider, optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor],
    cfg: OptimConfig,
) -> Callable[[], Any]:
    """The callable the benchmark times: ``optimizer.step``, preceded by torch's
    ``clip_grad_norm_`` when clipping is on and the provider does not clip inside its step."""
    if clip_mode(provider, cfg) != "clip_grad_norm_":
        return optimizer.step
    max_norm = cfg.max_grad_norm

    def clip_and_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # foreach left at torch's default
        optimizer.step()

    return clip_and_step


def step_backend(optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Which backend a triton_adam optimizer stepped on: "triton", "torch" (the fallback, where
    clipping runs as unfused torch math) or "mixed"; None for other optimizers or before a step.
    Reads the optimizer's private plan: a report note, never a reason to fail."""
    plan = getattr(optimizer, "_plan", None)
    triton, fallback = (bool(getattr(plan, name, None)) for name in ("triton_buckets", "torch_buckets"))
    if plan is None or not (triton or fallback):
        return None
    return "mixed" if triton and fallback else ("triton" if triton else "torch")


def load_factory(provider: Provider, cfg: OptimConfig) -> "tuple[Optional[Factory], Optional[str]]":
    """Import a provider's library: (factory, None), or (None, reason) when it is unavailable."""
    try:
        return provider.load(cfg), None
    except Exception as exc:  # ImportError, AttributeError, or a library failing at import
        return None, f"{type(exc).__name__}: {exc}"
