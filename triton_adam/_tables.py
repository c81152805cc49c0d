"""What the step and the grad-norm launches share: launch sizes, dtypes, block maps, uploads."""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

# Elements per program and warps per program of the step kernel, and the tile a program updates
# at a time (a loop of BLOCK_SIZE / TILE_SIZE tiles). Whole 4096-element tiles needed up to 166
# registers, and ptxas 13 spilled bf16 amsgrad variants; 2048-element tiles (8 float32 per thread,
# two 16-byte accesses per array) do not spill. To be re-tuned by measurement on a GPU.
BLOCK_SIZE = 4096
NUM_WARPS = 8
ALIGNED_TILE_SIZE = 2048
UNALIGNED_TILE_SIZE = 2048
# Unaligned steps that also carry a master's array: scalar accesses keep a 64-bit address per
# element and array live, and ptxas spilled a few bytes at 2048 (sm_90, bf16 moments).
UNALIGNED_MASTER_TILE_SIZE = 1024


# Quantised moments (QUANT) hold codes, block maxima and the dense path of small tensors in the
# same program. With 8 warps and 2048-element tiles a thread holds 8 consecutive elements, so a
# warp holds a 256-element block whole (its maximum is a warp shuffle, no barrier). A program
# updates one aligned tile (step_block_size), and a tensor's partial last tile goes in masked
# pieces (kernels/adam_step.py): then the aligned kernels need at most 80 registers, so 3
# programs (24 warps) fit an SM and keep 60 KB of loads in flight for float32 params with int8
# moments, where 2 programs of up to 128 registers kept 40 KB (perf/kernel_stats.py, sm_90).
# 4 warps x 1024 is the same per thread in smaller programs (7 an SM at <= 72 registers), but
# spills with amsgrad at 1024 elements. Unaligned tiles, whose scalar accesses need more
# registers, stay at 512, four to a program. To be re-tuned by measurement on a GPU
# (perf/quant_tune.py sweeps these).
QUANT_NUM_WARPS = 8
ALIGNED_QUANT_TILE_SIZE = 2048
UNALIGNED_QUANT_TILE_SIZE = 512
# amsgrad's third moment with stochastic rounding or a master spilled 16-24 B at 2048 (triton
# 3.6 and 3.9); at 1024 nothing does
ALIGNED_QUANT_AMSGRAD_TILE_SIZE = 1024
# ptxas's register ceilings for the quantised kernels (65536 registers an SM: 3 programs of 8
# warps at <= 80, 2 at <= 128). Every aligned specialisation fits 80 without spilling under
# triton 3.6 and 3.9, for sm_80 and sm_90; unaligned ones loop over tiles and need up to 128
# (left alone, ptxas kept some at 80 registers and spilled 12-20 bytes).
ALIGNED_QUANT_MAX_REGISTERS = 80
UNALIGNED_QUANT_MAX_REGISTERS = 128


def step_max_registers(quant: int, aligned: bool):
    """The step kernel's register ceiling for a QUANT mode (0: dense moments, None: ptxas's
    choice) and alignment class."""
    if not quant:
        return None
    return ALIGNED_QUANT_MAX_REGISTERS if aligned else UNALIGNED_QUANT_MAX_REGISTERS


def step_block_size(quant: int = 0, amsgrad: bool = False) -> int:
    """Elements per program of the step kernel (and of the grad norm over its block map) for a
    QUANT mode (0: dense moments). A quantised program updates one aligned tile: a loop over
    two made ptxas keep every pointer and coefficient of the program live across the loop, 40
    registers more (triton 3.6, sm_90)."""
    if quant:
        return ALIGNED_QUANT_AMSGRAD_TILE_SIZE if amsgrad else ALIGNED_QUANT_TILE_SIZE
    return BLOCK_SIZE


def step_num_warps(quant: int = 0) -> int:
    """The step kernel's warps per program for a QUANT mode (0: dense moments)."""
    return QUANT_NUM_WARPS if quant else NUM_WARPS


def step_tile_size(aligned: bool, master: int, quant: int = 0, amsgrad: bool = False) -> int:
    """The step kernel's TILE_SIZE for an alignment class, MASTER mode (0: none), QUANT mode
    (0: dense moments) and amsgrad."""
    if quant:
        if not aligned:
            return UNALIGNED_QUANT_TILE_SIZE
        return ALIGNED_QUANT_AMSGRAD_TILE_SIZE if amsgrad else ALIGNED_QUANT_TILE_SIZE
    if aligned:
        return ALIGNED_TILE_SIZE
    return UNALIGNED_MASTER_TILE_SIZE if master else UNALIGNED_TILE_SIZE

ALIGNMENT = 16

_TRITON_DTYPES = None


def triton_dtype(dtype: torch.dtype):
    global _TRITON_DTYPES
    if _TRITON_DTYPES is None:
        import triton.language as tl
        _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                          torch.float16: tl.float16, torch.int8: tl.int8}
    return _TRITON_DTYPES[dtype]


def upload(host: Tensor, device_tensor: Tensor, keep_alive: list) -> None:
    """Copy a small host tensor into ``device_tensor`` without waiting for the device."""
    if device_tensor.device.type == "cpu":
        device_tensor.copy_(host)
        return
    pinned = host.pin_memory()
    device_tensor.copy_(pinned, non_blocking=True)
    if torch.cuda.is_current_stream_capturing():
        # A captured copy re-reads this host buffer at every replay.
        keep_alive.append(pinned)


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A small host array as a new device tensor, copied without waiting for the device."""
    host = torch.from_numpy(np.ascontiguousarray(array))
    target = torch.empty(host.shape, dtype=host.dtype, device=device)
    upload(host, target, [])  # outside capture the pinned buffer outlives the copy by itself
    return target


def build_block_map(blocks_per_tensor: np.ndarray) -> np.ndarray:
    """int32 ``[n_blocks, 2]``: (tensor index, block index in that tensor) for each program.

    Block indices stay int32 (2**31 blocks of BLOCK_SIZE elements); the kernel widens them to
    int64 before multiplying by BLOCK_SIZE.
    """
    blocks_per_tensor = np.asarray(blocks_per_tensor, dtype=np.int64)
    n_blocks = int(blocks_per_tensor.sum())
    if n_blocks >= 2**31:
        raise ValueError(f"{n_blocks} blocks exceed one launch's grid; split the model")
    tensor_index = np.repeat(np.arange(len(blocks_per_tensor), dtype=np.int32),
                             blocks_per_tensor)
    first_block = np.cumsum(blocks_per_tensor) - blocks_per_tensor
    block_index = np.arange(n_blocks, dtype=np.int64) - np.repeat(first_block, blocks_per_tensor)
    return np.ascontiguousarray(np.stack([tensor_index, block_index.astype(np.int32)], axis=1))


def on_device(device: torch.device):
    """Context in which Triton launches go to ``device`` and its current stream.

    Triton launches on the *current* CUDA device; with params on several GPUs each bucket must
    make its own device current, or its kernels would run on another GPU's stream.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
