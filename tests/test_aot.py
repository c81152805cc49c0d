"""Every kernel specialisation compiles ahead of time for sm_80 and sm_90 with the real compiler.

Runs in a subprocess: the Triton interpreter flag of the test process is read at import.
"""
import json
import os
import subprocess
import sys

import pytest

# TRITON_ADAM_AOT=coverage (the old-Triton lane of CI) compiles the precision roles in one AMP
# mode only (see aot.step_kernel_specs)
COVERAGE = os.environ.get("TRITON_ADAM_AOT") == "coverage"
SCRIPT = """
import json, sys
from triton_adam.aot import compile_all
reports = compile_all(sys.argv[1], coverage=sys.argv[2] == "1")
for r in reports:
    r.pop("ptx")
print(json.dumps(reports))
"""


TARGETS = ["sm_80", "sm_90"]


@pytest.fixture(scope="module")
def compilers():
    """Both targets' compile jobs, started together (one process each: two cores, half the
    wall time); every process is waited for or killed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    processes = {t: subprocess.Popen([sys.executable, "-c", SCRIPT, t, str(int(COVERAGE))],
                                     env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for t in TARGETS}
    yield processes
    for process in processes.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module", params=TARGETS)
def reports(request, compilers):
    try:
        stdout, stderr = compilers[request.param].communicate(timeout=600)
    except subprocess.TimeoutExpired:
        compilers[request.param].kill()
        raise
    assert compilers[request.param].returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def test_every_specialisation_compiles(reports):
    counts = {}
    for r in reports:
        counts[r["name"]] = counts.get(r["name"], 0) + 1
    # dtype roles: 12 plain (param, grad, state), 8 float32-master, 10 Kahan, 4 remainder,
    # 4 stochastic rounding; each x amsgrad x 3 AMP modes x aligned
    # and 5 int8-moment roles without amsgrad
    step = (12 + 8 + 10 + 4 + 4) * 2 * 3 * 2 + 5 * 3 * 2
    if COVERAGE:
        step = 12 * 2 * 3 * 2 + (8 + 10 + 4 + 4) * 2 * 2 + 5 * 2
    assert counts == {"adam_coefficients_kernel": 4, "adam_step_kernel": step,
                      "grad_norm_partials_kernel": 3 * 3 * 2, "grad_norm_finalize_kernel": 3 * 3,
                      "grad_norm_segments_kernel": 3}
    assert all(r["ptx_bytes"] > 0 and r["registers"] > 0 for r in reports)


def test_nothing_spills(reports):
    spilled = [(r["name"], r["spec"], r["spill_bytes"]) for r in reports if r["spill_bytes"]]
    assert not spilled


def test_aligned_step_kernels_use_16_byte_accesses(reports):
    for r in reports:
        if r["name"] == "adam_step_kernel" and r["spec"]["ALIGNED"]:
            assert r["ld_vector_width"] == 4 and r["st_vector_width"] == 4, r["spec"]
        elif r["name"] == "grad_norm_partials_kernel" and r["spec"]["ALIGNED"]:
            assert r["ld_vector_width"] == 4, r["spec"]
        elif r["name"] in ("adam_step_kernel", "grad_norm_partials_kernel"):
            # without the alignment promise the compiler must not assume it
            assert r["ld_vector_width"] == 1, r["spec"]
