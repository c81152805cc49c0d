"""Every kernel specialisation compiles ahead of time for sm_80 and sm_90 with the real compiler.

The compiles run in subprocesses (the Triton interpreter flag of the test process is read at
import), started in the background when the session collects (tests/aot_jobs.py).
"""
import json

import pytest

import aot_jobs

pytestmark = pytest.mark.aot


@pytest.fixture(scope="module", params=aot_jobs.TARGETS)
def reports(request):
    returncode, stdout, stderr = aot_jobs.result(request.param, timeout=1200)
    assert returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_every_specialisation_compiles(reports):
    counts = {}
    for r in reports:
        counts[r["name"]] = counts.get(r["name"], 0) + 1
    # dense-moment dtype roles: 12 plain (param, grad, state), 8 float32-master, 10 Kahan,
    # 4 remainder, 4 stochastic rounding; each x amsgrad x 3 AMP modes x aligned
    step = (12 + 8 + 10 + 4 + 4) * 2 * 3 * 2
    if aot_jobs.SCOPE == "coverage":  # the precision roles in one AMP mode
        step = 12 * 2 * 3 * 2 + (8 + 10 + 4 + 4) * 2 * 2
    # quantised moments, 3 formats, one AMP mode: 17 roles (fp32 params: 1; bf16: 2 grad
    # dtypes x none, Kahan, master, remainder, stochastic rounding; fp16: 2 x none, Kahan,
    # master) x amsgrad x aligned; "ci" and "coverage": amsgrad with float32 grads, 9 roles
    step += 3 * (17 * 2 * 2 if aot_jobs.SCOPE == "all" else 9 * 2)
    step += 3 * 3 * 2  # each format's 3 other block sizes (quant_block_size), aligned or not
    # grad dtypes x norms x aligned, over dense buckets' block maps; over quantised ones' (2
    # block sizes): the same, or ("ci", "coverage") float32 grads and the L2 norm
    partials = 3 * 3 * 2 + 2 * (3 * 3 * 2 if aot_jobs.SCOPE == "all" else 2)
    assert counts == {"adam_coefficients_kernel": 4, "adam_step_kernel": step,
                      "grad_norm_partials_kernel": partials, "grad_norm_finalize_kernel": 3 * 3,
                      "grad_norm_segments_kernel": 3}
    assert all(r["ptx_bytes"] > 0 and r["registers"] > 0 for r in reports)


def test_nothing_spills(reports):
    spilled = [(r["name"], r["spec"], r["spill_bytes"]) for r in reports if r["spill_bytes"]]
    assert not spilled


def test_aligned_quantised_kernels_fit_three_programs_an_sm(reports):
    """Under their register ceiling (3 programs of 8 warps an SM), with no local memory at
    all: one tile a program, partial tiles in pieces (see _tables.step_block_size)."""
    quantised = [r for r in reports if r["name"] == "adam_step_kernel"
                 and r["spec"]["QUANT"] and r["spec"]["ALIGNED"]]
    assert quantised
    for r in quantised:
        assert r["num_warps"] == 8 and r["spec"]["BLOCK_SIZE"] == r["spec"]["TILE_SIZE"]
        assert r["registers"] <= 80 and r["stack_bytes"] == 0, (r["spec"], r["registers"])


def test_aligned_step_kernels_use_16_byte_accesses(reports):
    for r in reports:
        if r["name"] == "adam_step_kernel" and r["spec"]["ALIGNED"]:
            assert r["ld_vector_width"] == 4 and r["st_vector_width"] == 4, r["spec"]
        elif r["name"] == "grad_norm_partials_kernel" and r["spec"]["ALIGNED"]:
            assert r["ld_vector_width"] == 4, r["spec"]
        elif r["name"] in ("adam_step_kernel", "grad_norm_partials_kernel"):
            # without the alignment promise the compiler must not assume it
            assert r["ld_vector_width"] == 1, r["spec"]
