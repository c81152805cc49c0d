"""The ahead-of-time compile jobs of tests/test_aot.py, started in the background at collection.

Compiling every kernel specialisation for sm_80 and sm_90 takes minutes of CPU, and most other
tests keep one core busy (the Triton interpreter is single-threaded): started when the session
collects, at a lower priority, the compiles use the idle core while the other tests run, and the
tests marked ``aot`` (moved to the end of the session) collect the reports.
"""
import os
import subprocess
import sys
import tempfile

TARGETS = ["sm_80", "sm_90"]
# TRITON_ADAM_AOT: the step kernel's reduced set ("ci", the default; "coverage" in the
# old-Triton lane of CI; "all": every specialisation, as `triton-adam kernels` compiles)
SCOPE = os.environ.get("TRITON_ADAM_AOT", "ci")
SCRIPT = """
import json, sys
from triton_adam.aot import compile_all
reports = compile_all(sys.argv[1], scope=sys.argv[2])
for r in reports:
    r.pop("ptx")
print(json.dumps(reports))
"""
_jobs = {}  # target -> (process, stdout file, stderr file)


def start() -> None:
    """Start one compile process per target (once per session)."""
    if _jobs:
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for target in TARGETS:
        # files, not pipes: a full pipe would stall the compile until someone reads it
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        process = subprocess.Popen([sys.executable, "-c", SCRIPT, target, SCOPE], env=env,
                                   stdout=out, stderr=err, text=True,
                                   preexec_fn=lambda: os.nice(10))
        _jobs[target] = (process, out, err)


def result(target: str, timeout: float):
    """(return code, stdout, stderr) of ``target``'s job, waiting at most ``timeout`` s."""
    start()
    process, out, err = _jobs[target]
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    out.seek(0)
    err.seek(0)
    return process.returncode, out.read(), err.read()


def stop() -> None:
    """Kill whatever still runs (an interrupted or deselected session)."""
    for process, out, err in _jobs.values():
        if process.poll() is None:
            process.kill()
            process.wait()
        out.close()
        err.close()
    _jobs.clear()
