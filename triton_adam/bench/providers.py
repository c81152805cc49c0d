"""The optimizers the benchmark compares, each behind one small adapter.

A provider knows how to import its library, whether it supports a case (device, dtype, amsgrad,
Adam vs AdamW), how to build an optimizer over a list of params, and how its bytes/step are
counted: ``"model"`` uses the explicit byte model with the state dtype the optimizer actually
allocated; ``"state"`` counts the optimizer's own state tensors (8-bit and compressed states,
per-block scales included). Import failures are reported with the exception text, never hidden.

Peers run wherever they run, CPU included: none is declared CUDA-only. A peer that refuses the
device or dtype raises ``NotImplementedError`` when built or stepped (flashoptim on a CPU), and
the runner reports that case as skipped with the peer's own message. ``build`` makes any provider's
optimizer by name for code other than the benchmark (the experiments' side-by-side curves).

With ``OptimConfig.max_grad_norm`` set, the timed step is "clip + step": triton-adam gets
``max_grad_norm=`` (the clip is fused into its step); every other provider runs
``torch.nn.utils.clip_grad_norm_`` (torch's default foreach choice) and then its own step,
which is what a training loop using it does.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

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
    state_dtype: Optional[str] = None  # "fp32"/"bf16"/"int8"/"int4"/"fp8": triton-adam's
    # triton-adam's precision options for 16-bit params (the other providers ignore them)
    master_weights: Optional[str] = None  # "true" or "compact"
    kahan_summation: bool = False
    stochastic_rounding: bool = False

    def precision_options(self) -> Dict[str, Any]:
        """The keyword arguments of triton-adam's precision options this config sets."""
        options: Dict[str, Any] = {}
        if self.master_weights:
            options["master_weights"] = {"true": True, "compact": "compact"}[self.master_weights]
        if self.kahan_summation:
            options["kahan_summation"] = True
        if self.stochastic_rounding:
            options["stochastic_rounding"] = True
            options["seed"] = 0
        return options


Factory = Callable[[Sequence[torch.Tensor], OptimConfig], torch.optim.Optimizer]


@dataclass(frozen=True)
class Provider:
    """One optimizer implementation under test."""

    name: str
    description: str
    load: Callable[[OptimConfig], Factory]  # imports the library; raises if unavailable
    package: str  # the PyPI distribution whose version a record carries
    bytes_source: str = "model"  # "model" or "state", see module docstring
    supports_amsgrad: bool = True  # False: the peer's API has no amsgrad option
    supports_adam: bool = True  # False: AdamW only
    low_precision_only: bool = False  # a bf16/fp16 technique: fp32 params would repeat another row
    fused_clip: bool = False  # clips inside its own step (max_grad_norm=); else torch clips first
    takes_precision_options: bool = False  # triton-adam: master weights, Kahan, SR

    def unsupported_reason(self, cfg: OptimConfig,
                           dtype: Optional[torch.dtype] = None) -> Optional[str]:
        """Why this provider has no row for the case (an API fact, not a device guess), or None."""
        if cfg.amsgrad and not self.supports_amsgrad:
            return "no amsgrad option"
        if cfg.kind == "adam" and not self.supports_adam:
            return "AdamW only"
        if self.low_precision_only and dtype == torch.float32:
            return "bf16/fp16 params only (the technique does nothing for fp32)"
        options = cfg.precision_options() if self.takes_precision_options else {}
        if options and dtype == torch.float32:
            return f"{', '.join(options)}: bf16/fp16 params only"
        if (cfg.master_weights == "compact" or cfg.stochastic_rounding) and \
                self.takes_precision_options and dtype == torch.float16:
            return "compact masters and stochastic rounding: bf16 params only"
        return None

    def version(self) -> Optional[str]:
        """The installed version of the provider's package, None when it is not installed."""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


def _common(cfg: OptimConfig) -> Dict[str, Any]:
    return dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def _load_triton_adam(cfg: OptimConfig) -> Factory:
    import triton_adam

    cls = triton_adam.AdamW if cfg.kind == "adamw" else triton_adam.Adam
    state_dtypes = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "int8": "int8",
                    "int4": "int4", "fp8": "fp8"}
    return lambda params, c: cls(params, amsgrad=c.amsgrad, backend="auto",
                                 max_grad_norm=c.max_grad_norm,
                                 state_dtype=state_dtypes[c.state_dtype],
                                 **c.precision_options(), **_common(c))


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


def _optimi_loader(kahan_sum: bool) -> Callable[[OptimConfig], Factory]:
    """optimi with Kahan summation on or off: on, it keeps a Kahan buffer per bf16/fp16 param
    (the "optimi-kahan" row); off, its bytes compare like for like with torch's."""
    def load(cfg: OptimConfig) -> Factory:
        import optimi

        cls = optimi.AdamW if cfg.kind == "adamw" else optimi.Adam
        return lambda params, c: cls(params, kahan_sum=kahan_sum, **_common(c))

    return load


def _load_flashoptim(cfg: OptimConfig) -> Factory:
    import flashoptim

    cls = flashoptim.FlashAdamW if cfg.kind == "adamw" else flashoptim.FlashAdam
    return lambda params, c: cls(params, **_common(c))


def _load_heavyball(cfg: OptimConfig) -> Factory:
    import heavyball

    # heavyball consumes .grad (sets it to None) by default; kept, as every other optimizer does,
    # so that each timed step has grads to apply.
    return lambda params, c: heavyball.AdamW(params, consume_grad=False, **_common(c))


def _torchao_loader(adamw: str, adam: Optional[str],
                    **flags: Any) -> Callable[[OptimConfig], Factory]:
    """torchao.optim's class ``adamw`` (``adam`` for Adam; None: it has no Adam class)."""
    def load(cfg: OptimConfig) -> Factory:
        mod = importlib.import_module("torchao.optim")
        cls = getattr(mod, adamw if cfg.kind == "adamw" or adam is None else adam)
        return lambda params, c: cls(params, amsgrad=c.amsgrad, **flags, **_common(c))

    return load


def _load_bnb(cfg: OptimConfig) -> Factory:
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if cfg.kind == "adamw" else bnb.optim.Adam8bit
    return lambda params, c: cls(params, **_common(c))


PROVIDERS: List[Provider] = [
    Provider("triton-adam", "triton_adam.AdamW/Adam, backend='auto'", _load_triton_adam,
             "triton-adam", fused_clip=True, takes_precision_options=True),
    Provider("forloop", "torch.optim, foreach=False", _torch_loader(foreach=False), "torch"),
    Provider("foreach", "torch.optim, foreach=True", _torch_loader(foreach=True), "torch"),
    Provider("fused", "torch.optim, fused=True", _torch_loader(fused=True), "torch"),
    Provider("apex", "apex.optimizers.FusedAdam", _load_apex, "apex", supports_amsgrad=False),
    Provider("transformer-engine", "transformer_engine FusedAdam", _load_te,
             "transformer-engine-torch", supports_amsgrad=False),
    Provider("optimi", "torch-optimi AdamW (kahan_sum=False)", _optimi_loader(False),
             "torch-optimi", supports_amsgrad=False),
    Provider("optimi-kahan", "torch-optimi AdamW (kahan_sum=True: Kahan buffer per param)",
             _optimi_loader(True), "torch-optimi", bytes_source="state", supports_amsgrad=False,
             low_precision_only=True),
    Provider("flashoptim", "flashoptim FlashAdamW (compressed states, 24-bit master)",
             _load_flashoptim, "flashoptim", bytes_source="state", supports_amsgrad=False),
    Provider("heavyball", "heavyball.AdamW (consume_grad=False)", _load_heavyball, "heavyball",
             bytes_source="state", supports_amsgrad=False, supports_adam=False),
    Provider("torchao-8bit", "torchao.optim AdamW8bit (blockwise 8-bit states)",
             _torchao_loader("AdamW8bit", "Adam8bit"), "torchao", bytes_source="state"),
    Provider("torchao-4bit", "torchao.optim AdamW4bit (blockwise 4-bit states)",
             _torchao_loader("AdamW4bit", "Adam4bit"), "torchao", bytes_source="state"),
    Provider("torchao-fp8", "torchao.optim AdamWFp8 (blockwise float8 e4m3 states)",
             _torchao_loader("AdamWFp8", "AdamFp8"), "torchao", bytes_source="state"),
    Provider("torchao-bf16-sr", "torchao.optim _AdamW(bf16_stochastic_round=True)",
             _torchao_loader("_AdamW", None, bf16_stochastic_round=True), "torchao",
             bytes_source="state", supports_adam=False, low_precision_only=True),
    Provider("bnb-8bit", "bitsandbytes AdamW8bit (blockwise 8-bit states)", _load_bnb,
             "bitsandbytes", bytes_source="state", supports_amsgrad=False),
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


def build(name: str, params: Iterable[Any],
          cfg: OptimConfig = OptimConfig()) -> torch.optim.Optimizer:
    """Provider ``name``'s optimizer over ``params`` (tensors or param groups), configured by
    ``cfg``: the same peers, wired the same way, for code other than the benchmark (the
    experiments' side-by-side curves). Raises ValueError for an unknown name or a case the
    provider has no row for; a missing library raises its own ImportError, and a peer that refuses
    the device raises its own error (NotImplementedError) when built or stepped."""
    (provider,) = select([name])
    params = list(params)
    dtype = next((p.dtype for p in params if isinstance(p, torch.Tensor)), None)
    reason = provider.unsupported_reason(cfg, dtype)
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    return provider.load(cfg)(params, cfg)
