"""Static performance model of the step kernel's specialisations, without a GPU.

    python perf/kernel_stats.py [--target sm_90] [--sweep] [--json stats.json]

One row per specialisation the bench times: the dense kernel in each precision rung (float32;
bfloat16 with bfloat16 moments; stochastic rounding; the compact master; a float32 master;
Kahan; float16) at the dense launch (_tables), and the quantised formats (int8, int4, fp8 on
float32 and bfloat16 params) at the quantised launch (with --sweep, at each of its candidate
launch configurations: warps per program, elements per tile, which is also the program's, and
ptxas's register ceiling). Each is compiled with the Triton compiler and ptxas that ship with
triton, and the row reports:

* registers, spills and shared memory of the real kernel (adam_step_kernel, aligned, no
  amsgrad; the quantised ones with the AMP arguments they always take);
* the SASS of one full tile (``_adam_block`` alone, in a small harness kernel): instructions
  per element on the hot path (the slow-path call sites of the IEEE division and square root
  left out, 5 instructions each) without a grad scale, as bf16 and fp32 training run, and with
  an AMP grad scale other than 1 (its division of the grad, skipped at run time for a unit
  scale); barriers and warp shuffles per tile;
* occupancy: programs and warps an SM holds (65536 registers, 64 warps, 32 programs,
  228 KB of shared memory), and the bytes of loads those programs have in flight at once
  (one tile each): by Little's law what bounds the bandwidth of a kernel that loads, computes
  and stores a tile at a time;
* the H200 model on Llama-3.2-1B: the time to issue the instructions (132 SMs at 1.98 GHz, 4
  schedulers an SM issuing one warp-instruction a cycle) against the time to move the bytes
  (triton_adam.bench.byte_model) at the 4.3 TB/s copy bandwidth; ``issue_share`` is their
  ratio, at most ISSUE_TARGET for a kernel that stays memory-bound.

A model, not a measurement: perf/dense_tune.py and perf/quant_tune.py time the launches on a
GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

from triton_adam import aot
from triton_adam import _tables
from triton_adam.bench import byte_model, presets
from triton_adam.kernels import adam_step, moment_codes

QUANTS = {"none": int(moment_codes.QUANT_NONE), "int8": int(moment_codes.QUANT_INT8),
          "int4": int(moment_codes.QUANT_INT4), "fp8": int(moment_codes.QUANT_FP8)}
QUANT_BLOCKS = {"none": 256, "int8": 256, "int4": 128, "fp8": 256}
# (warps per program, elements per aligned tile, register ceiling): the quantised kernel's
# candidates; a quantised program updates one tile (_tables.step_block_size)
CANDIDATES = [(8, 2048, 80), (8, 2048, 64), (8, 2048, 128), (8, 1024, 80), (4, 1024, 80),
              (4, 2048, 128)]
SM_REGISTERS, SM_WARPS, SM_PROGRAMS, SM_SHARED = 65536, 64, 32, 228 * 1024
SLOW_PATH_PER_CALL = 5  # MOVs of the arguments, CALL, MOV of the result: run only off the fast path


@triton.jit
def one_tile_kernel(param, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, master,
                    coef, table, PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
                    MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
                    QUANT: tl.constexpr, QUANT_BLOCK: tl.constexpr, TILE_SIZE: tl.constexpr,
                    HAS_GRAD_SCALE: tl.constexpr):
    """One full, aligned tile of the step per program: the code whose SASS is counted."""
    start = tl.program_id(0).to(tl.int64) * TILE_SIZE
    code_start = start // 2 if QUANT == moment_codes.QUANT_INT4 else start
    lanes = tl.arange(0, TILE_SIZE)
    rng_key, rng_stream, rng_counter = adam_step._random_stream(coef, table, start,
                                                                STOCHASTIC_ROUNDING)
    adam_step._adam_block(
        tl.multiple_of(param + start, 16), tl.multiple_of(grad + start, 16),
        tl.multiple_of(exp_avg + code_start, 16), tl.multiple_of(exp_avg_sq + code_start, 16),
        exp_avg_sq, tl.multiple_of(master + start, 16), lanes, None,
        tl.load(coef), tl.load(coef + 1), tl.load(coef + 2), tl.load(coef + 3),
        tl.load(coef + 4), tl.load(coef + 5), tl.load(coef + 6), tl.load(coef + 7),
        tl.load(coef + 8), tl.load(coef + 9), tl.load(coef + 10), rng_key, rng_stream,
        rng_counter, exp_avg_scale + start // QUANT_BLOCK,
        exp_avg_sq_scale + start // QUANT_BLOCK, exp_avg_sq_scale, TILE_SIZE, PARAM_DTYPE,
        STATE_DTYPE, False, HAS_GRAD_SCALE, MASTER, STOCHASTIC_ROUNDING, QUANT, QUANT_BLOCK,
        TILE_SIZE)


def _sass(cubin: bytes, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = Path(get_ptxas(arch).path).with_name("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True,
                              check=True).stdout


def _opcodes(sass: str, kernel: str) -> list:
    """The kernel body's opcodes up to its first EXIT (the slow-path subroutines follow)."""
    body = sass.split(f".text.{kernel}:", 1)[1]
    body = re.split(r"\n\s+/\*[0-9a-f]+\*/\s+EXIT", body)[0]
    return [op for op in re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)",
                                    body) if op != "NOP"]


# the precision rungs the bench times on dense moments: (name, param, grad, moments, MASTER,
# stochastic rounding); the moments' dtype is the optimizer's default for the rung
# (triton_adam._precision.of: a master's are float32, the others the param's)
DENSE_ROLES = [
    ("fp32", "fp32", "fp32", "fp32", "none", False),
    ("bf16", "bf16", "bf16", "bf16", "none", False),
    ("bf16 stochastic rounding", "bf16", "bf16", "bf16", "none", True),
    ("bf16 compact master", "bf16", "bf16", "bf16", "remainder", False),
    ("bf16 master fp32", "bf16", "bf16", "fp32", "fp32", False),
    ("bf16 kahan", "bf16", "bf16", "bf16", "kahan", False),
    ("fp16", "fp16", "fp16", "fp16", "none", False),
]
MASTERS = {"none": int(adam_step.MASTER_NONE), "fp32": int(adam_step.MASTER_FP32),
           "remainder": int(adam_step.MASTER_REMAINDER), "kahan": int(adam_step.MASTER_KAHAN)}
TL_DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# the issue-rate model of an H200: 132 SMs at 1.98 GHz, 4 schedulers an SM each issuing one
# warp-instruction a cycle; the copy bandwidth measured there (bytes read + written)
H200_SMS, H200_HZ, SCHEDULERS, H200_COPY_BYTES_PER_S = 132, 1.98e9, 4, 4.3e12
MODEL_PRESET = "llama-3.2-1b"
ISSUE_TARGET = 0.6  # issue time at most this share of byte time leaves the kernel memory-bound


def _master_dtype(param: str, master: str) -> str:
    return {"fp32": "*fp32", "remainder": "*i16"}.get(master, "*" + param)


def tile_stats(param: str, quant: str, num_warps: int, tile: int, arch: int,
               max_registers: int | None = None, state: str = "fp32", master: str = "none",
               stochastic: bool = False) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = "*" + param
    codes = {"none": "*" + state, "int8": "*i8"}.get(quant, "*u8")
    signature = {"param": pointer, "grad": pointer, "exp_avg": codes,
                 "exp_avg_sq": "*" + state if quant == "none" else "*u8",
                 "exp_avg_scale": "*fp32", "exp_avg_sq_scale": "*fp32",
                 "master": _master_dtype(param, master), "coef": "*fp32", "table": "*i64",
                 "PARAM_DTYPE": "constexpr", "STATE_DTYPE": "constexpr", "MASTER": "constexpr",
                 "STOCHASTIC_ROUNDING": "constexpr", "QUANT": "constexpr",
                 "QUANT_BLOCK": "constexpr", "TILE_SIZE": "constexpr",
                 "HAS_GRAD_SCALE": "constexpr"}
    per_thread = tile // (32 * num_warps)
    stats = {}
    for has_grad_scale in (True, False):
        constexprs = {"PARAM_DTYPE": TL_DTYPES[param], "STATE_DTYPE": TL_DTYPES[state],
                      "MASTER": MASTERS[master], "STOCHASTIC_ROUNDING": stochastic,
                      "QUANT": QUANTS[quant], "QUANT_BLOCK": QUANT_BLOCKS[quant],
                      "TILE_SIZE": tile, "HAS_GRAD_SCALE": has_grad_scale}
        compiled = triton.compile(
            ASTSource(fn=one_tile_kernel, signature=signature, constexprs=constexprs),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": num_warps, "enable_fp_fusion": False,
                     **({"maxnreg": max_registers} if max_registers else {})})
        ops = _opcodes(_sass(compiled.asm["cubin"], arch), "one_tile_kernel")
        hot = round((len(ops) - SLOW_PATH_PER_CALL * ops.count("CALL")) / per_thread, 1)
        if has_grad_scale:
            stats["instructions_per_element_amp"] = hot
        else:
            stats.update({"instructions_per_element": hot, "elements_per_thread": per_thread,
                          "barriers_per_tile": ops.count("BAR"),
                          "shuffles_per_tile": ops.count("SHFL"),
                          "shared_accesses_per_tile": ops.count("STS") + ops.count("LDS")})
    return stats


def _bytes(param: str, quant: str, state: str, master: str) -> tuple:
    """(bytes a step moves per element, bytes it loads per element), from the bench's model."""
    dtype = TORCH_DTYPES[param]
    moments = quant if quant != "none" else TORCH_DTYPES[state]
    extra = {"fp32": torch.float32, "remainder": torch.int16,
             "kahan": dtype}.get(master)
    moved = byte_model.adam_bytes_per_element(dtype, dtype, moments, False, extra)
    loaded = 2 * dtype.itemsize + byte_model.held_bytes_per_element(dtype, moments, False, extra)
    return moved, loaded


def kernel_stats(param: str, quant: str, num_warps: int, tile: int, arch: int,
                 max_registers: int | None = None, state: str = "fp32", master: str = "none",
                 stochastic: bool = False) -> dict:
    spec = dict(PARAM_DTYPE=param, GRAD_DTYPE=param, STATE_DTYPE=state, AMSGRAD=False,
                MASTER=MASTERS[master], STOCHASTIC_ROUNDING=stochastic,
                HAS_GRAD_SCALE=quant != "none", HAS_FOUND_INF=quant != "none", ALIGNED=True,
                BLOCK_SIZE=tile if quant != "none" else _tables.BLOCK_SIZE, TILE_SIZE=tile,
                QUANT=QUANTS[quant],
                QUANT_BLOCK=QUANT_BLOCKS[quant])
    compiled = aot._compile(adam_step.adam_step_kernel, aot.STEP_SIGNATURE, spec, arch,
                            num_warps, max_registers)
    report = aot._ptxas_report(compiled.asm["ptx"], arch)
    shared = int(compiled.metadata.shared)
    allocated = -(-report["registers"] // 8) * 8
    warps = min(SM_WARPS, SM_REGISTERS // (allocated * 32))
    programs = min(warps // num_warps, SM_PROGRAMS, SM_SHARED // shared if shared else 99)
    moved, loaded = _bytes(param, quant, state, master)
    return {"registers": report["registers"], "spill_bytes": report["spill_bytes"],
            "shared_bytes": shared, "programs_per_sm": programs,
            "warps_per_sm": programs * num_warps, "bytes_per_element": round(moved, 2),
            "kb_in_flight_per_sm": round(programs * tile * loaded / 1024, 1)}


def issue_model(instructions_per_element: float, bytes_per_element: float,
                numel: int) -> dict:
    """The H200 model: time to issue a step's SASS over ``numel`` elements (a warp-instruction
    serves 32 threads) against time to move its bytes at the copy bandwidth."""
    issue_s = numel * instructions_per_element / 32 / (H200_SMS * SCHEDULERS * H200_HZ)
    bytes_s = numel * bytes_per_element / H200_COPY_BYTES_PER_S
    return {"issue_ms": round(1e3 * issue_s, 2), "bytes_ms": round(1e3 * bytes_s, 2),
            "issue_share": round(issue_s / bytes_s, 2)}


def configs(sweep: bool = False):
    """(name, param, state, moments or code format, MASTER, stochastic, warps, tile, register
    ceiling) of each row: the dense rungs at the dense launch, the quantised formats at the
    default quantised launch (every candidate with ``sweep``)."""
    dense_warps, dense_tile = _tables.NUM_WARPS, _tables.ALIGNED_TILE_SIZE
    for name, param, _grad, state, master, stochastic in DENSE_ROLES:
        yield name, param, state, "none", master, stochastic, dense_warps, dense_tile, None
    candidates = CANDIDATES if sweep else CANDIDATES[:1]
    for quant in ("int8", "int4", "fp8"):
        for param in ("fp32", "bf16"):
            for warps, tile, ceiling in candidates:
                yield (f"{param} {quant}", param, "fp32", quant, "none", False, warps, tile,
                       ceiling)


def rows(target: str, sweep: bool = False):
    arch = aot._parse_target(target)
    numel = sum(math.prod(shape) for _, shape in presets.get_preset(MODEL_PRESET).params())
    for name, param, state, quant, master, stochastic, warps, tile, ceiling in configs(sweep):
        row = {"target": target, "role": name, "param": param,
               "state": quant if quant != "none" else state, "num_warps": warps,
               "tile": tile, "max_registers": ceiling or "-"}
        row.update(kernel_stats(param, quant, warps, tile, arch, ceiling, state, master,
                                stochastic))
        row.update(tile_stats(param, quant, warps, tile, arch, ceiling, state, master,
                              stochastic))
        row.update(issue_model(row["instructions_per_element"], row["bytes_per_element"],
                               numel))
        yield row


COLUMNS = ["role", "state", "num_warps", "tile", "max_registers", "registers", "spill_bytes",
           "shared_bytes", "programs_per_sm", "warps_per_sm", "kb_in_flight_per_sm",
           "elements_per_thread", "instructions_per_element", "instructions_per_element_amp",
           "barriers_per_tile", "shuffles_per_tile", "shared_accesses_per_tile",
           "bytes_per_element", "issue_ms", "bytes_ms", "issue_share"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="sm_90")
    parser.add_argument("--sweep", action="store_true",
                        help="every quantised launch candidate, not only the default")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_stats compiles for a GPU target: unset TRITON_INTERPRET")
    out = []
    print(f"triton {triton.__version__}, {args.target}; the H200 model on {MODEL_PRESET} "
          f"(issue_share: issue time / byte time, target <= {ISSUE_TARGET})\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows(args.target, args.sweep):
        out.append(row)
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
