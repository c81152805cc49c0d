"""Test set-up: without a GPU the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (importing torch does not import it).
"""
import os
import random
import zlib

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from triton_adam._plan import interpreter_enabled  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_on(device: str):
    """The backends that can run on ``device`` in this process."""
    if device == "cuda" or interpreter_enabled():
        return ["triton", "torch"]
    return ["torch"]


DEVICE_BACKENDS = [pytest.param(d, b, marks=[pytest.mark.cuda] if d == "cuda" else [],
                                id=f"{d}-{b}")
                   for d in DEVICES for b in backends_on(d)]


def stable_seed(*parts) -> int:
    """A seed from ``parts`` that is the same in every process.

    Python's ``hash()`` of strings changes from process to process (PYTHONHASHSEED), so seeds
    derived from it made test data differ between runs.
    """
    return zlib.crc32(repr(parts).encode())


@pytest.fixture(autouse=True)
def _deterministic_randomness(request):
    """Seed torch, numpy and random from the test's id before each test.

    Tests that draw from the global generators (module initialisation, ``torch.randn`` without a
    generator) then see the same numbers in every run, whatever ran before them.
    """
    seed = stable_seed(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (run by perf/gpu_check.sh)")
    config.addinivalue_line("markers", "aot: reads the ahead-of-time compile jobs (tests/aot_jobs.py; "
                            "run last, the jobs start at collection)")
    from interpreter_faults import loop_bound_error
    message = loop_bound_error()
    if message:
        raise pytest.UsageError(message)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    """Run the ``aot`` tests last, and start their compile jobs now, in the background.

    Last of the hooks: after ``-m``/``-k`` deselected items, so that ``-m cuda`` (the GPU
    check's 8 test workers) starts no compile job for tests that will not run."""
    aot = [item for item in items if item.get_closest_marker("aot")]
    if aot:
        items[:] = [item for item in items if not item.get_closest_marker("aot")] + aot
        if any(item.module.__name__ == "test_aot" for item in aot):
            import aot_jobs
            aot_jobs.start()


def pytest_sessionfinish(session, exitstatus):
    import aot_jobs
    aot_jobs.stop()


def pytest_report_header(config):
    import triton
    return (f"triton {triton.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
            f"interpreter {'on' if interpreter_enabled() else 'off'}")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test: on a busy 2-core box OpenMP barriers with descheduled
    threads stretch a 2 ms step to hundreds of ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
