"""Probes for known faults of older Triton interpreters, so tests skip precisely where they apply.

The oldest supported Triton (see pyproject.toml and the old-Triton lane of ``.ci/run``) compiles
the kernels correctly for the GPU, but its interpreter, which runs them on CPU tensors in these
tests, has faults that later Triton fixed. Each probe runs a tiny kernel that shows the fault, so a
skip depends on what this interpreter does, not on a version number.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from triton_adam._plan import interpreter_enabled


@triton.jit
def _fma_probe_kernel(x_ptr, out_ptr):
    a = tl.load(x_ptr)
    b = tl.load(x_ptr + 1)
    c = tl.load(x_ptr + 2)
    tl.store(out_ptr, tl.fma(a, b, c))


@triton.jit
def _loop_probe_kernel(out_ptr, n):
    total = 0
    for _ in range(0, n, 1):
        total += 1
    tl.store(out_ptr, total)


@functools.lru_cache(maxsize=None)
def fma_rounds_twice() -> bool:
    """True when the interpreter computes ``tl.fma(a, b, c)`` as ``a*b + c`` (two roundings).

    (1 + 2**-12)**2 = 1 + 2**-11 + 2**-24; rounded to float32 the 2**-24 is lost (a tie to
    even), so adding -(1 + 2**-11) gives 0 instead of the single-rounded 2**-24.
    """
    if not interpreter_enabled():
        return False
    x = torch.tensor([1 + 2**-12, 1 + 2**-12, -(1 + 2**-11)], dtype=torch.float32)
    out = torch.empty(1, dtype=torch.float32)
    _fma_probe_kernel[(1,)](x, out)
    return out.item() != 2**-24


@functools.lru_cache(maxsize=None)
def runtime_loop_bound_fails() -> bool:
    """True when a ``for`` loop over a runtime bound fails in the interpreter.

    Triton 3.6's interpreter holds scalar arguments as 1-element arrays and takes ``int()`` of
    them as a loop bound, which NumPy 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"); later Triton squeezes the array first.
    """
    if not interpreter_enabled():
        return False
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe_kernel[(1,)](out, 3)
    except Exception:  # noqa: BLE001 (any failure of the probe is the fault)
        return True
    return out.item() != 3


FMA_SKIP_REASON = (
    f"Triton {triton.__version__}'s interpreter computes tl.fma with two roundings (a*b, then "
    "+c; later Triton rounds once, as the GPU does), so float32 and bfloat16 results cannot be "
    "bit-identical to torch's fused CPU kernel here; the compiled kernels use a real fma")


def skip_if_fma_rounds_twice(dtype: torch.dtype) -> None:
    """Skip a bit-identity test of ``dtype`` results when the interpreter's fma rounds twice.

    float16 results keep passing under that fault (observed on every parametrisation, so they
    keep running); float32 and bfloat16 ones differ in the last bit.
    """
    import pytest

    if dtype in (torch.float32, torch.bfloat16) and fma_rounds_twice():
        pytest.skip(FMA_SKIP_REASON)


def loop_bound_error() -> str | None:
    """A message telling how to run the interpreter tests with this Triton, or None if usable."""
    if not runtime_loop_bound_fails():
        return None
    return (f"Triton {triton.__version__}'s interpreter cannot run a loop over a runtime bound "
            f"with NumPy {np.__version__} (it takes int() of a 1-element array, which NumPy 2.4 "
            "refuses); the grad-norm kernels need it. Install numpy<2.4 to run the interpreter "
            "tests with this Triton, as the old-Triton lane of .ci/run does.")
