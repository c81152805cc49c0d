"""Static performance model of the step kernel's launch configurations, without a GPU.

    python perf/kernel_stats.py [--target sm_90] [--json stats.json]

For each launch configuration (warps per program, elements per tile, which is also the
program's, and ptxas's register ceiling) of the quantised step kernel, and the dense float32
kernel as the yardstick (it ran at 83% of the copy bandwidth on an
H200, perf/results/nvidia-h200-2026-11-30), this compiles with the Triton compiler and ptxas
that ship with triton and reports:

* registers, spills and shared memory of the real kernel (adam_step_kernel, aligned, AMP
  arguments, no amsgrad, float32 or bfloat16 params);
* the SASS of one full tile (``_adam_block`` alone, in a small harness kernel): instructions
  per element on the hot path (the slow-path call sites of the IEEE division and square root
  left out, 5 instructions each) without a grad scale, as bf16 and fp32 training run, and with
  an AMP grad scale other than 1 (its division of the grad, skipped at run time for a unit
  scale, is in the code of every quantised specialisation); barriers and warp shuffles per tile;
* occupancy: programs and warps an SM holds (65536 registers, 64 warps, 32 programs,
  228 KB of shared memory), and the bytes of loads those programs have in flight at once
  (one tile each): by Little's law what bounds the bandwidth of a kernel that loads, computes
  and stores a tile at a time.

A model, not a measurement: perf/quant_tune.py measures the same configurations on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl

from triton_adam import aot
from triton_adam import _tables
from triton_adam.kernels import adam_step, moment_codes

QUANTS = {"none": int(moment_codes.QUANT_NONE), "int8": int(moment_codes.QUANT_INT8),
          "int4": int(moment_codes.QUANT_INT4), "fp8": int(moment_codes.QUANT_FP8)}
QUANT_BLOCKS = {"none": 256, "int8": 256, "int4": 128, "fp8": 256}
# (warps per program, elements per aligned tile, register ceiling): the quantised kernel's
# candidates; a quantised program updates one tile (_tables.step_block_size)
CANDIDATES = [(8, 2048, 80), (8, 2048, 64), (8, 2048, 128), (8, 1024, 80), (4, 1024, 80),
              (4, 2048, 128)]
DENSE = (8, 2048, None)  # the dense kernel's configuration (_tables)
SM_REGISTERS, SM_WARPS, SM_PROGRAMS, SM_SHARED = 65536, 64, 32, 228 * 1024
SLOW_PATH_PER_CALL = 5  # MOVs of the arguments, CALL, MOV of the result: run only off the fast path


@triton.jit
def one_tile_kernel(param, grad, exp_avg, exp_avg_sq, exp_avg_scale, exp_avg_sq_scale, coef,
                    PARAM_DTYPE: tl.constexpr, QUANT: tl.constexpr, QUANT_BLOCK: tl.constexpr,
                    TILE_SIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """One full, aligned tile of the step per program: the code whose SASS is counted."""
    start = tl.program_id(0).to(tl.int64) * TILE_SIZE
    code_start = start // 2 if QUANT == moment_codes.QUANT_INT4 else start
    lanes = tl.arange(0, TILE_SIZE)
    adam_step._adam_block(
        tl.multiple_of(param + start, 16), tl.multiple_of(grad + start, 16),
        tl.multiple_of(exp_avg + code_start, 16), tl.multiple_of(exp_avg_sq + code_start, 16),
        exp_avg_sq, param, lanes, None,
        tl.load(coef), tl.load(coef + 1), tl.load(coef + 2), tl.load(coef + 3),
        tl.load(coef + 4), tl.load(coef + 5), tl.load(coef + 6), tl.load(coef + 7),
        tl.load(coef + 8), tl.load(coef + 9), tl.load(coef + 10), 0, 0, 0,
        exp_avg_scale + start // QUANT_BLOCK, exp_avg_sq_scale + start // QUANT_BLOCK,
        exp_avg_sq_scale, TILE_SIZE, PARAM_DTYPE, tl.float32, False, HAS_GRAD_SCALE,
        adam_step.MASTER_NONE, False, QUANT, QUANT_BLOCK, TILE_SIZE)


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


def tile_stats(param: str, quant: str, num_warps: int, tile: int, arch: int,
               max_registers: int | None = None) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = {"fp32": "*fp32", "bf16": "*bf16"}[param]
    codes = {"none": "*fp32", "int8": "*i8"}.get(quant, "*u8")
    signature = {"param": pointer, "grad": pointer, "exp_avg": codes,
                 "exp_avg_sq": "*fp32" if quant == "none" else "*u8",
                 "exp_avg_scale": "*fp32", "exp_avg_sq_scale": "*fp32", "coef": "*fp32",
                 "PARAM_DTYPE": "constexpr", "QUANT": "constexpr", "QUANT_BLOCK": "constexpr",
                 "TILE_SIZE": "constexpr", "HAS_GRAD_SCALE": "constexpr"}
    per_thread = tile // (32 * num_warps)
    stats = {}
    for has_grad_scale in (True, False):
        constexprs = {"PARAM_DTYPE": {"fp32": tl.float32, "bf16": tl.bfloat16}[param],
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


def kernel_stats(param: str, quant: str, num_warps: int, tile: int, arch: int,
                 max_registers: int | None = None) -> dict:
    spec = dict(PARAM_DTYPE=param, GRAD_DTYPE=param, STATE_DTYPE="fp32", AMSGRAD=False,
                MASTER=int(adam_step.MASTER_NONE), STOCHASTIC_ROUNDING=False,
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
    # per element, loaded: param, grad (its dtype) and the moments (4 B each dense; codes)
    itemsize = {"fp32": 4, "bf16": 2}[param]
    loaded = 2 * itemsize + {"none": 8, "int8": 2, "fp8": 2, "int4": 1}[quant]
    return {"registers": report["registers"], "spill_bytes": report["spill_bytes"],
            "shared_bytes": shared, "programs_per_sm": programs,
            "warps_per_sm": programs * num_warps,
            "kb_in_flight_per_sm": round(programs * tile * loaded / 1024, 1)}


def rows(target: str):
    arch = aot._parse_target(target)
    configs = [("fp32", "none", *DENSE)]
    configs += [(param, quant, *candidate) for quant in ("int8", "int4", "fp8")
                for param in ("fp32", "bf16") for candidate in CANDIDATES]
    for param, quant, warps, tile, ceiling in configs:
        row = {"target": target, "param": param, "state": quant, "num_warps": warps,
               "tile": tile, "max_registers": ceiling or "-"}
        row.update(kernel_stats(param, quant, warps, tile, arch, ceiling))
        row.update(tile_stats(param, quant, warps, tile, arch, ceiling))
        yield row


COLUMNS = ["param", "state", "num_warps", "tile", "max_registers", "registers", "spill_bytes",
           "shared_bytes", "programs_per_sm", "warps_per_sm", "kb_in_flight_per_sm",
           "elements_per_thread", "instructions_per_element", "instructions_per_element_amp",
           "barriers_per_tile", "shuffles_per_tile", "shared_accesses_per_tile"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="sm_90")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_stats compiles for a GPU target: unset TRITON_INTERPRET")
    out = []
    print(f"triton {triton.__version__}, {args.target}\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows(args.target):
        out.append(row)
        print("| " + " | ".join(str(row[c]) for c in COLUMNS) + " |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
