"""Runs every (preset, dtype, provider) case and collects one JSON-ready record.

With clipping on (``OptimConfig.max_grad_norm``), every provider's timed step is "clip + step"
(see ``providers.make_step``) on grads whose global norm is at least ``CLIP_MARGIN`` times the
max norm, so the clip really scales them; the grads are restored before every step, outside the
timed region, because torch's ``clip_grad_norm_`` rewrites them in place.
"""
from __future__ import annotations

import gc
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from . import byte_model, env, presets, timing
from . import providers as provs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# 2: rows carry "clip", "grad_norm", "step_backend"; config "clip".
# 3: rows carry "version"; measured rows "held_bytes", "held_bytes_per_param",
#    "speedup_vs_triton_adam".
# 4: measured rows carry "device_ms", "device_min_ms" (the step's kernels with the host ahead of
#    the GPU) and "host_ahead" (timing.py).
SCHEMA_VERSION = 4
# With --clip, the grads' global norm is at least this many times the max norm (clip factor <= 1/4).
CLIP_MARGIN = 4.0


@dataclass
class BenchConfig:
    """What to run. ``presets=None`` means the device's embedded default."""

    device: str = "auto"
    presets: Optional[List[str]] = None
    dtypes: List[str] = field(default_factory=lambda: ["fp32"])
    providers: Optional[List[str]] = None
    optim: provs.OptimConfig = field(default_factory=provs.OptimConfig)
    warmup: int = 3
    repeats: int = 20
    quick: bool = False
    seed: int = 0
    threads: Optional[int] = None  # torch intra-op threads on CPU; None keeps torch's default


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    return dev


def _make_params(shapes, dtype, device, seed) -> List[torch.Tensor]:
    """Params and fresh random (never zero) grads, identical for every provider of a case."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        p.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        params.append(p)
    return params


def _memory_needed(shapes, dtype: torch.dtype, cfg: provs.OptimConfig) -> int:
    """Params, grads and states, plus room for a few temporaries of the largest tensor (foreach)."""
    numels = [presets.numel(s) for _, s in shapes]
    size = byte_model.dtype_size(dtype)
    n_states = 3 if cfg.amsgrad else 2
    n_copies = 2 + n_states + (1 if cfg.max_grad_norm is not None else 0)  # + saved grads
    return sum(numels) * size * n_copies + 3 * max(numels) * size


def _case_skip_reason(preset: presets.Preset, shapes, dtype, device, cfg) -> Optional[str]:
    if preset.gpu_only and device.type != "cuda":
        return "GPU-only preset"
    if device.type == "cuda":
        need = _memory_needed(shapes, dtype, cfg)
        free, _ = torch.cuda.mem_get_info(device)
        if need > 0.9 * free:
            return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def _global_grad_norm(params: List[torch.Tensor]) -> float:
    """The grads' global 2-norm, accumulated in float32 (setup only: reads it on the host)."""
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params]
    return float(torch.linalg.vector_norm(torch.stack(norms)))


def _clip_setup(params: List[torch.Tensor], max_norm: Optional[float]):
    """For a clipped run: scale the grads up (never down, never to zero) until their global norm
    is at least ``CLIP_MARGIN * max_norm``, and keep a copy of them. Returns (restore, norm):
    ``restore`` puts the copy back before each step, since torch's clip rewrites the grads and
    would otherwise leave every later step a norm of max_norm (a clip factor of ~1).
    Without clipping: (None, None)."""
    if max_norm is None:
        return None, None
    norm = _global_grad_norm(params)
    target = CLIP_MARGIN * max_norm
    if norm < target:
        with torch.no_grad():
            torch._foreach_mul_([p.grad for p in params], target / norm)
        norm = _global_grad_norm(params)
    if not math.isfinite(norm):  # e.g. fp16 grads scaled past 65504 for a huge max norm
        raise ValueError(f"--clip {max_norm} needs grads with a norm of {target:g}, which "
                         f"overflows this dtype; use a smaller max norm")
    saved = [p.grad.clone() for p in params]

    def restore() -> None:
        with torch.no_grad():
            torch._foreach_copy_([p.grad for p in params], saved)

    return restore, norm


def _step_bytes(provider, opt, params, dtype, cfg) -> Optional[int]:
    """The step's bytes (byte model or the optimizer's own state), plus the clip's passes over
    the grads when clipping is on; None when the step's bytes cannot be determined."""
    grad_dtype = params[0].grad.dtype
    quantized = "exp_avg_scale" in opt.state.get(params[0], {})
    if provider.bytes_source == "state" or quantized:
        # (8-bit moments: codes, block scales, and the small params' float32 moments as held)
        nbytes = byte_model.bytes_from_optimizer_state(opt, params)
    else:
        # The state dtype the optimizer really allocated (fp32 states for bf16 params cost more),
        # and the master / remainder / compensation it steps with the param, if any.
        state = opt.state.get(params[0], {})
        exp_avg = state.get("exp_avg")
        state_dtype = exp_avg.dtype if isinstance(exp_avg, torch.Tensor) else dtype
        extra = next((state[k] for k in ("master_param", "master_remainder",
                                         "kahan_compensation") if k in state), None)
        per = byte_model.adam_bytes_per_element(
            dtype, grad_dtype, state_dtype, cfg.amsgrad,
            extra.dtype if isinstance(extra, torch.Tensor) else None)
        nbytes = per * sum(p.numel() for p in params)
    mode = provs.clip_mode(provider, cfg)
    if nbytes is None or mode is None:
        return nbytes
    return nbytes + byte_model.clip_bytes((p.numel() for p in params), grad_dtype,
                                          fused=(mode == "fused"))


def _run_one(provider, factory, shapes, dtype, device, cfg: BenchConfig) -> Dict[str, Any]:
    params = _make_params(shapes, dtype, device, cfg.seed)
    opt = restore = None
    try:
        opt = factory(params, cfg.optim)
        restore, grad_norm = _clip_setup(params, cfg.optim.max_grad_norm)
        step = provs.make_step(provider, opt, params, cfg.optim)
        t = timing.time_steps(step, device, warmup=max(cfg.warmup, 1), repeats=cfg.repeats,
                              before_each=restore)
        if any(p.grad is None for p in params):
            raise RuntimeError("the optimizer set .grad to None in its step: the timed steps "
                               "after it had no grads to apply")
        nbytes = _step_bytes(provider, opt, params, dtype, cfg.optim)
        held = byte_model.held_bytes(opt, params)
        n_params = sum(p.numel() for p in params)
        backend = provs.step_backend(opt)
    finally:
        del opt, params, restore
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "status": "ok",
        "median_ms": t.median_ms,
        "min_ms": t.min_ms,
        "max_ms": t.max_ms,
        "host_ms": t.host_median_ms,
        "device_ms": t.device_median_ms,  # the kernels alone: the host queued ahead of the GPU
        "device_min_ms": t.device_min_ms,
        "host_ahead": t.host_ahead,  # fraction of repeats where it did; None on a CPU
        "repeats": t.repeats,
        "peak_extra_bytes": t.peak_extra_bytes,
        "bytes_per_step": nbytes,
        "bytes_source": provider.bytes_source,
        "gbps": (nbytes / (t.median_ms * 1e-3) / 1e9) if nbytes else None,
        "held_bytes": held,  # states + master the optimizer keeps (byte_model.held_bytes)
        "held_bytes_per_param": (held / n_params) if held is not None else None,
        "clip": provs.clip_mode(provider, cfg.optim),
        "grad_norm": grad_norm,  # global norm the clip sees each step (> max norm); None: no clip
        "step_backend": backend,
    }


def _case_times(results: List[Dict[str, Any]], provider: str) -> Dict[tuple, float]:
    """Median step time of ``provider`` per (preset, dtype) case where it was measured."""
    return {(r["preset"], r["dtype"]): r["median_ms"]
            for r in results if r["provider"] == provider and r["status"] == "ok"}


def _derive(results: List[Dict[str, Any]], copy_gbps: Optional[float]) -> None:
    """Fraction of copy bandwidth and speed relative to torch fused and to triton-adam, within
    each case (> 1 means faster than the reference)."""
    fused, ours = _case_times(results, "fused"), _case_times(results, "triton-adam")
    for r in results:
        if r["status"] != "ok":
            continue
        r["fraction_of_copy"] = (r["gbps"] / copy_gbps) if (r["gbps"] and copy_gbps) else None
        case = (r["preset"], r["dtype"])
        r["speedup_vs_fused"] = (fused[case] / r["median_ms"]) if case in fused else None
        r["speedup_vs_triton_adam"] = (ours[case] / r["median_ms"]) if case in ours else None


def count_cases(cfg: BenchConfig, device: torch.device) -> int:
    """Number of progress ticks a run makes: copy bandwidth plus one per case and provider."""
    names = cfg.presets or [presets.default_preset(device.type)]
    return 1 + len(names) * len(cfg.dtypes) * len(provs.select(cfg.providers))


def run_bench(
    cfg: BenchConfig, on_progress: Optional[Callable[[str], None]] = None
) -> Dict[str, Any]:
    """Run the benchmark and return its record. Ctrl-C stops it early: the record then holds
    what was measured so far and ``interrupted: true``."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset_names = cfg.presets or [presets.default_preset(device.type)]
    for name in preset_names:
        presets.get_preset(name)  # fail fast on typos
    for d in cfg.dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from: {', '.join(DTYPES)}")
    selected = provs.select(cfg.providers)
    tick = on_progress or (lambda _msg: None)

    record: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "run": env.run_metadata(device),
        "config": {
            "presets": preset_names,
            "dtypes": cfg.dtypes,
            "providers": [p.name for p in selected],
            "optimizer": asdict(cfg.optim),
            "clip": cfg.optim.max_grad_norm is not None,
            "max_grad_norm": cfg.optim.max_grad_norm,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "quick": cfg.quick,
            "seed": cfg.seed,
            "threads": torch.get_num_threads(),
        },
        "byte_model": {"note": byte_model.NEGLIGIBLE_NOTE,
                       "clip_note": byte_model.CLIP_NOTE if cfg.optim.max_grad_norm is not None
                       else None},
        "timing_note": (
            "median over repeats after warm-up; CUDA events + synchronize on GPU, "
            "perf_counter on CPU; host_ms is the wall time of step() without synchronizing; "
            "device_ms is the events' time with a GPU-side sleep queued before the start "
            "event, so the step's launches queue up behind it and the Python between them is "
            "not counted (host_ahead: the fraction of repeats where the host did get ahead); "
            "on CPU host_ms = device_ms = step time; peak_extra_bytes is null on CPU"
        ),
        "presets": {},
        "copy_bandwidth": None,
        "results": [],
        "interrupted": False,
    }
    results: List[Dict[str, Any]] = record["results"]
    try:
        tick("copy bandwidth")
        bw = timing.measure_copy_bandwidth(device, timing.default_copy_bytes(device))
        record["copy_bandwidth"] = {"bytes_copied": bw.nbytes, "median_ms": bw.median_ms,
                                    "gbps": bw.gbps, "counts": "read + write"}
        for pname in preset_names:
            preset = presets.get_preset(pname)
            shapes = preset.params()
            record["presets"][pname] = {"description": preset.description, **presets.describe(shapes)}
            for dname in cfg.dtypes:
                dtype = DTYPES[dname]
                case_reason = _case_skip_reason(preset, shapes, dtype, device, cfg.optim)
                for prov in selected:
                    tick(f"{pname} {dname} {prov.name}")
                    row: Dict[str, Any] = {"preset": pname, "dtype": dname, "provider": prov.name,
                                           "description": prov.description,
                                           "version": prov.version()}
                    reason = case_reason or prov.unsupported_reason(cfg.optim, dtype)
                    factory = None
                    if reason is None:
                        factory, reason = provs.load_factory(prov, cfg.optim)
                    if reason is not None:
                        row.update(status="skipped", reason=reason)
                    else:
                        try:
                            row.update(_run_one(prov, factory, shapes, dtype, device, cfg))
                        except KeyboardInterrupt:
                            raise
                        except NotImplementedError as exc:  # the peer refuses this device/dtype
                            row.update(status="skipped", reason=f"NotImplementedError: {exc}")
                        except Exception as exc:
                            row.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                    results.append(row)
    except KeyboardInterrupt:
        record["interrupted"] = True
    copy = record["copy_bandwidth"]
    _derive(results, copy["gbps"] if copy else None)
    if hasattr(os, "getloadavg"):  # the start's load is in run_metadata; a busy end shows here
        record["run"]["load_average_1m_end"] = os.getloadavg()[0]
    record["warnings"] = _load_warnings(device)
    return record


def _load_warnings(device: torch.device) -> List[str]:
    """Flag CPU runs on an oversubscribed machine: with more runnable threads than cores, torch's
    OpenMP barriers wait for descheduled threads and a 3 ms step can take 600 ms."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return []
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > cores + 1:
        return [f"load average {load:.1f} on {cores} cores while measuring: CPU timings are "
                f"unreliable (other processes compete); --threads 1 is steadier"]
    return []
