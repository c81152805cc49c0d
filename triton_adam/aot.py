"""Ahead-of-time compilation of every kernel specialisation, for checks and tuning (no GPU needed).

``compile_all("sm_90")`` compiles each specialisation the optimizer can launch with the real Triton
compiler and ptxas that ship with triton, and reports registers, shared memory, spills, the widest
global load/store and the PTX size. It must run in a process without ``TRITON_INTERPRET``; with
``workers`` > 1 it compiles in as many spawned processes (each imports the kernels afresh).
"""
from __future__ import annotations

import itertools
import multiprocessing
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from ._tables import (ALIGNED_TILE_SIZE, BLOCK_SIZE, NUM_WARPS, UNALIGNED_TILE_SIZE,
                      step_block_size, step_max_registers, step_num_warps, step_tile_size)
from ._quantize import BLOCK_SIZES
from .kernels import adam_step, grad_norm, moment_codes

DTYPES = ("fp32", "bf16", "fp16")
# GradScaler gives found_inf alone (after unscale_) or with grad_scale; grad_scale never alone.
AMP_MODES = {"none": (False, False), "found_inf": (False, True), "scale": (True, True)}


def dtype_roles():
    """(param, grad, state, master, stochastic rounding) as the optimizer pairs them: moments in
    the param's dtype, float32 or bfloat16 (``state_dtype``); grads in the param's dtype, or
    float32 for 16-bit params; for 16-bit params a float32 master (MASTER_FP32), a Kahan
    compensation (MASTER_KAHAN), and for bfloat16 params the master's remainder
    (MASTER_REMAINDER) or stochastic rounding."""
    for dtype in DTYPES:
        for state_dtype in dict.fromkeys((dtype, "fp32", "bf16")):
            for grad_dtype in dict.fromkeys((dtype, "fp32")):
                yield dtype, grad_dtype, state_dtype, int(adam_step.MASTER_NONE), False
                if dtype == "fp32":
                    continue
                yield dtype, grad_dtype, state_dtype, int(adam_step.MASTER_KAHAN), False
                if state_dtype != "fp16":  # masters' moments: float32 or bfloat16
                    yield dtype, grad_dtype, state_dtype, int(adam_step.MASTER_FP32), False
                if dtype == "bf16":
                    yield dtype, grad_dtype, state_dtype, int(adam_step.MASTER_REMAINDER), False
                    yield dtype, grad_dtype, state_dtype, int(adam_step.MASTER_NONE), True


# state_dtype code formats -> (the step kernel's QUANT, elements per scale)
QUANT_FORMATS = {"int8": (int(moment_codes.QUANT_INT8), 256),
                 "int4": (int(moment_codes.QUANT_INT4), 128),
                 "fp8": (int(moment_codes.QUANT_FP8), 256)}
SCOPES = ("default", "all", "ci", "coverage")
# The step kernel's roles a user picks, as ``role_of`` names them; ``compile_all(filters=)``
# keeps the specialisations whose role is in each given set.
ROLE_VALUES = {
    "param": DTYPES,
    "state": ("fp32", "bf16", "fp16", *QUANT_FORMATS),
    "master": ("none", "fp32", "remainder", "kahan", "sr"),
    "amsgrad": ("off", "on"),
    "amp": tuple(AMP_MODES),
}
_MASTER_ROLES = {int(adam_step.MASTER_NONE): "none", int(adam_step.MASTER_FP32): "fp32",
                 int(adam_step.MASTER_REMAINDER): "remainder",
                 int(adam_step.MASTER_KAHAN): "kahan"}


def role_of(spec: dict) -> dict:
    """The step kernel specialisation's role in ROLE_VALUES' terms (stochastic rounding is a
    "master" role: it replaces one)."""
    quant = {code: name for name, (code, _) in QUANT_FORMATS.items()}
    amp = {flags: name for name, flags in AMP_MODES.items()}
    return {"param": spec["PARAM_DTYPE"],
            "state": quant.get(spec["QUANT"], spec["STATE_DTYPE"]),
            "master": "sr" if spec["STOCHASTIC_ROUNDING"] else _MASTER_ROLES[spec["MASTER"]],
            "amsgrad": "on" if spec["AMSGRAD"] else "off",
            "amp": amp[(spec["HAS_GRAD_SCALE"], spec["HAS_FOUND_INF"])]}


def _plain(spec: dict) -> bool:
    """The roles of ``triton_adam.AdamW(params)`` with every option left alone: moments and
    grads in the params' dtype (not quantised), no master, no amsgrad, no AMP; either alignment."""
    role = role_of(spec)
    return (spec["STATE_DTYPE"] == spec["GRAD_DTYPE"] == role["state"] == role["param"]
            and (role["master"], role["amsgrad"], role["amp"]) == ("none", "off", "none"))


def _quantized_roles():
    """The roles of a quantised group: its params' dtypes and masters, float32 moments for the
    tensors too small to quantise."""
    return [role for role in dtype_roles() if role[2] == "fp32"]


def step_kernel_specs(scope: str = "all"):
    """The constexpr combinations of ``adam_step_kernel`` that the optimizer launches.

    ``scope``: "default", the plain roles (``_plain``: what ``triton-adam kernels`` compiles
    unless told more); "all", every one; "ci", every dense-moment one and
    those quantised ones that bound the others (amsgrad, float32 grads: the most registers;
    every format, param dtype, master and alignment; the other block sizes in the role with
    the most registers, as in "all"); "coverage" (the old-Triton lane of CI),
    moreover the precision roles only in the AMP mode with the most code (grad_scale and
    found_inf), which bounds the others' registers. Quantised launches always take the AMP
    arguments (see _plan.TritonBucket.step_amp_arguments).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "default":
        yield from (spec for spec in step_kernel_specs("all") if _plain(spec))
        return
    for (dtype, grad_dtype, state_dtype, master, stochastic), amsgrad, amp, aligned in \
            itertools.product(dtype_roles(), (False, True), AMP_MODES, (True, False)):
        if scope == "coverage" and (master or stochastic) and amp != "scale":
            continue
        has_scale, has_inf = AMP_MODES[amp]
        yield dict(PARAM_DTYPE=dtype, GRAD_DTYPE=grad_dtype, STATE_DTYPE=state_dtype,
                   AMSGRAD=amsgrad, MASTER=master, STOCHASTIC_ROUNDING=stochastic,
                   HAS_GRAD_SCALE=has_scale, HAS_FOUND_INF=has_inf, ALIGNED=aligned,
                   BLOCK_SIZE=BLOCK_SIZE, TILE_SIZE=step_tile_size(aligned, master),
                   QUANT=int(moment_codes.QUANT_NONE), QUANT_BLOCK=256)
    for name, (quant, quant_block) in QUANT_FORMATS.items():
        for (dtype, grad_dtype, state_dtype, master, stochastic), amsgrad, aligned in \
                itertools.product(_quantized_roles(), (False, True), (True, False)):
            if scope != "all" and not (amsgrad and grad_dtype == "fp32"):
                continue
            yield _quantized_spec(dtype, grad_dtype, state_dtype, master, stochastic, amsgrad,
                                  aligned, quant, quant_block)
        # the other block sizes (quant_block_size) in the role with the most registers
        for block, aligned in itertools.product(BLOCK_SIZES, (True, False)):
            if block != quant_block:
                yield _quantized_spec("bf16", "fp32", "fp32", int(adam_step.MASTER_FP32), False,
                                      True, aligned, quant, block)


def _quantized_spec(dtype, grad_dtype, state_dtype, master, stochastic, amsgrad, aligned, quant,
                    quant_block):
    return dict(PARAM_DTYPE=dtype, GRAD_DTYPE=grad_dtype, STATE_DTYPE=state_dtype,
                AMSGRAD=amsgrad, MASTER=master, STOCHASTIC_ROUNDING=stochastic,
                HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, ALIGNED=aligned,
                BLOCK_SIZE=step_block_size(quant, amsgrad),
                TILE_SIZE=step_tile_size(aligned, master, quant, amsgrad),
                QUANT=quant, QUANT_BLOCK=quant_block)


def coefficient_kernel_specs():
    for has_inf, has_norm in itertools.product((False, True), (False, True)):
        yield dict(HAS_FOUND_INF=has_inf, HAS_GRAD_NORM=has_norm, BLOCK=adam_step.COEF_BLOCK)


NORMS = {"l2": 2, "l1": 1, "inf": grad_norm.NORM_INF}


def grad_norm_partials_specs(scope: str = "all"):
    """Over the block maps of dense and quantised buckets (see _tables.step_block_size);
    ``scope`` other than "all": the quantised ones' block sizes for float32 grads and the L2
    norm only (the same code over shorter blocks)."""
    block_sizes = dict.fromkeys(step_block_size(quant, amsgrad) for quant in (0, 1)
                                for amsgrad in (False, True))
    for dtype, norm, aligned, block in itertools.product(DTYPES, NORMS.values(), (True, False),
                                                         block_sizes):
        if scope != "all" and block != BLOCK_SIZE and (dtype, norm) != ("fp32", NORMS["l2"]):
            continue
        tile = ALIGNED_TILE_SIZE if aligned else UNALIGNED_TILE_SIZE
        yield dict(GRAD_DTYPE=dtype, NORM=norm, ALIGNED=aligned, BLOCK_SIZE=block,
                   TILE_SIZE=min(tile, block))


def grad_norm_finalize_specs():
    for norm, amp in itertools.product(NORMS.values(), AMP_MODES):
        has_scale, has_inf = AMP_MODES[amp]
        yield dict(NORM=norm, HAS_FOUND_INF=has_inf, HAS_GRAD_SCALE=has_scale,
                   BLOCK=grad_norm.FINALIZE_BLOCK)


def grad_norm_segments_specs():
    for norm in NORMS.values():
        yield dict(NORM=norm, BLOCK=grad_norm.FINALIZE_BLOCK)


def _parse_target(target: str) -> int:
    match = re.fullmatch(r"sm_?(\d+)a?", target)
    if not match:
        raise ValueError(f"target must look like sm_80 or sm_90, got {target!r}")
    return int(match.group(1))


def _compile(fn, signature, spec, arch, num_warps, maxnreg=None):
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "int8": tl.int8}
    constexprs = {k: dtypes.get(v, v) if isinstance(v, str) else v for k, v in spec.items()}
    full_signature = dict(signature, **{k: "constexpr" for k in spec})
    source = ASTSource(fn=fn, signature=full_signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False,
                                   **({"maxnreg": maxnreg} if maxnreg else {})})


def _ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spills and shared memory as ptxas -v prints them for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
             str(path), "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True, text=True, check=True)
    log = result.stderr + result.stdout

    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {"registers": number(r"Used (\d+) registers"),
            "spill_bytes": number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
            "stack_bytes": number(r"(\d+) bytes stack frame"),
            "ptxas_shared_bytes": number(r"(\d+) bytes smem")}


def _vector_width(ptx: str, op: str) -> int:
    widths = [int(w) for w in re.findall(rf"{op}\.global(?:\.\w+)*?\.v(\d)", ptx)]
    return max(widths, default=1)


STEP_SIGNATURE = {"tensor_table": "*i64", "grad_table": "*i64", "block_map": "*i32",
                  "coef_table": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32"}
COEF_SIGNATURE = {"tensor_table": "*i64", "hyper_table": "*fp64", "coef_table": "*fp32",
                  "found_inf_ptr": "*fp32", "grad_norm_ptr": "*fp32", "n_tensors": "i32"}
PARTIALS_SIGNATURE = {"tensor_table": "*i64", "grad_table": "*i64", "block_map": "*i32",
                      "partials": "*fp32", "nonfinite_counts": "*i32", "partial_offset": "i32"}
FINALIZE_SIGNATURE = {"partials": "*fp32", "nonfinite_counts": "*i32", "n_partials": "i32",
                      "norm_out": "*fp32", "nonfinite_out": "*fp32", "found_inf_ptr": "*fp32",
                      "grad_scale_ptr": "*fp32"}
SEGMENTS_SIGNATURE = {"partials": "*fp32", "nonfinite_counts": "*i32",
                      "segment_of_partial": "*i32", "n_partials": "i32", "segment_out": "*fp32",
                      "nonfinite_out": "*fp32"}


# kernel name -> (function, signature); the jobs name their kernel so they pickle
def _kernels() -> Dict[str, tuple]:
    return {"adam_coefficients_kernel": (adam_step.adam_coefficients_kernel, COEF_SIGNATURE),
            "adam_step_kernel": (adam_step.adam_step_kernel, STEP_SIGNATURE),
            "grad_norm_partials_kernel": (grad_norm.grad_norm_partials_kernel,
                                          PARTIALS_SIGNATURE),
            "grad_norm_finalize_kernel": (grad_norm.grad_norm_finalize_kernel,
                                          FINALIZE_SIGNATURE),
            "grad_norm_segments_kernel": (grad_norm.grad_norm_segments_kernel,
                                          SEGMENTS_SIGNATURE)}


def kernel_jobs(scope: str = "all", filters: Optional[Dict[str, Iterable[str]]] = None):
    """(kernel name, spec, num_warps) of each specialisation ``compile_all`` compiles.

    ``scope`` as in ``step_kernel_specs``; "default" adds only the coefficient kernel without
    AMP. ``filters`` (ROLE_VALUES' keys -> allowed values) keep the step kernel's matching
    roles and leave out the other kernels, which have no such roles."""
    filters = {k: set(v) for k, v in (filters or {}).items() if v}
    for key, values in filters.items():
        unknown = values - set(ROLE_VALUES.get(key, ()))
        if key not in ROLE_VALUES or unknown:
            raise ValueError(f"filter {key}={','.join(sorted(values))}: choose from "
                             f"{', '.join(ROLE_VALUES.get(key, ROLE_VALUES))}")
    jobs = [("adam_step_kernel", s, step_num_warps(s["QUANT"])) for s in step_kernel_specs(scope)
            if all(role_of(s)[key] in values for key, values in filters.items())]
    if filters:
        return jobs
    coefficients = [s for s in coefficient_kernel_specs()
                    if scope != "default" or not s["HAS_FOUND_INF"]]
    jobs = [("adam_coefficients_kernel", s, 4) for s in coefficients] + jobs
    if scope == "default":
        return jobs
    jobs += [("grad_norm_partials_kernel", s, NUM_WARPS) for s in grad_norm_partials_specs(scope)]
    jobs += [("grad_norm_finalize_kernel", s, 4) for s in grad_norm_finalize_specs()]
    jobs += [("grad_norm_segments_kernel", s, 4) for s in grad_norm_segments_specs()]
    return jobs


def compile_job(job: tuple, arch: int) -> dict:
    """Compile one ``kernel_jobs`` entry for ``sm_<arch>`` and report on it (see compile_all)."""
    name, spec, num_warps = job
    fn, signature = _kernels()[name]
    # quantised step kernels launch with a register ceiling (see _tables)
    maxnreg = step_max_registers(spec.get("QUANT", 0), spec.get("ALIGNED", True))
    compiled = _compile(fn, signature, spec, arch, num_warps, maxnreg)
    ptx = compiled.asm["ptx"]
    report = {"name": name, "spec": spec, "target": f"sm_{arch}", "num_warps": num_warps,
              "shared_bytes": int(compiled.metadata.shared),
              "ld_vector_width": _vector_width(ptx, "ld"),
              "st_vector_width": _vector_width(ptx, "st"),
              "ptx_bytes": len(ptx.encode()), "ptx": ptx}
    report.update(_ptxas_report(ptx, arch))
    return report


def compile_all(target: str = "sm_90", scope: str = "all",
                filters: Optional[Dict[str, Iterable[str]]] = None, workers: int = 1,
                on_start: Optional[Callable[[int], None]] = None,
                on_done: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Compile every specialisation of ``scope`` (and ``filters``, see ``kernel_jobs``) for
    ``target`` ("sm_80", "sm_90", ...) and report on each, in ``kernel_jobs`` order.

    ``workers`` > 1 compiles in that many spawned processes (they start without the parent's
    imports, so kernels the parent loaded under the interpreter do not leak in; the process
    environment must not set ``TRITON_INTERPRET``). ``on_start(n_jobs)`` is called once the jobs
    are known, ``on_done(report)`` as each compile ends (a progress bar).

    Returns one dict per kernel: name, spec, registers, shared_bytes, spill_bytes, stack_bytes,
    ld_vector_width, st_vector_width (widest ``ld/st.global.vN``, 1 when scalar), ptx_bytes,
    and the PTX itself under ``ptx``.
    """
    arch = _parse_target(target)
    jobs = kernel_jobs(scope, filters)
    if on_start is not None:
        on_start(len(jobs))
    done = on_done or (lambda _report: None)
    if workers <= 1 or len(jobs) <= 1:
        reports = []
        for job in jobs:
            reports.append(compile_job(job, arch))
            done(reports[-1])
        return reports
    reports = [None] * len(jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(compile_job, job, arch): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            reports[futures[future]] = future.result()
            done(reports[futures[future]])
    return reports
