"""The perf/ scripts that tune the kernels: quant_tune.py runs its candidates through the bench;
kernel_stats.py compiles a launch candidate and reads its SASS."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from triton_adam import _tables
from triton_adam.bench import timing
from triton_adam.kernels import adam_step

PERF = Path(__file__).resolve().parent.parent / "perf"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, PERF / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quant_tune_launches_each_candidate_and_restores_the_table(monkeypatch, tmp_path,
                                                                   capsys):
    monkeypatch.setattr(timing, "default_copy_bytes", lambda device: 2**20)
    launched = []
    launch = adam_step.launch_adam_step

    def recording(*args, **kwargs):
        spec, block, tile, warps = args[7], args[8], args[9], args[10]
        if spec["QUANT"] and spec["ALIGNED"]:
            assert block == tile  # a quantised program updates one tile
            launched.append((warps, tile, kwargs.get("maxnreg")))
        return launch(*args, **kwargs)

    monkeypatch.setattr(adam_step, "launch_adam_step", recording)
    default = (_tables.QUANT_NUM_WARPS, _tables.ALIGNED_QUANT_TILE_SIZE,
               _tables.ALIGNED_QUANT_MAX_REGISTERS)
    out = tmp_path / "tune.json"
    quant_tune = _load("quant_tune")
    assert quant_tune.main(["--preset", "smoke-cpu", "--dtype", "fp32", "--steps", "1",
                            "--candidates", "8x512/64,2x1024", "--formats", "int8",
                            "--device", "cpu", "--json", str(out)]) == 0
    assert {(8, 512, 64), (2, 1024, default[2])} <= set(launched)
    assert (_tables.QUANT_NUM_WARPS, _tables.ALIGNED_QUANT_TILE_SIZE,
            _tables.ALIGNED_QUANT_MAX_REGISTERS) == default
    table = capsys.readouterr().out
    assert "| fp32 | int8 | 8x512/64 |" in table
    assert f"| fp32 | int8 | 2x1024/{default[2]} |" in table
    records = json.loads(out.read_text())
    assert [r["status"] for r in records] == ["ok"] * 3
    assert [r["candidate"] for r in records] == [None, "8x512/64", f"2x1024/{default[2]}"]


def test_quant_tune_reads_candidates():
    quant_tune = _load("quant_tune")
    ceiling = _tables.ALIGNED_QUANT_MAX_REGISTERS
    assert quant_tune._candidates("4x1024,8X2048/64") == [(4, 1024, ceiling), (8, 2048, 64)]
    with pytest.raises(ValueError):
        quant_tune._candidates("4-1024")


def _compiled_stats(script):
    """What ``script`` (kernel_stats imported as k) prints last as JSON, run in a process
    without the interpreter (it compiles for a GPU target)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = "import json, sys; sys.path.insert(0, sys.argv[1]); import kernel_stats as k; " + \
        script
    result = subprocess.run([sys.executable, "-c", script, str(PERF)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.aot  # compiles for a GPU target: with the other compile tests, last
def test_kernel_stats_models_the_default_quantised_launch():
    """The one-tile harness still calls the step kernel's block function as it is, and the
    model's numbers for the default int8 launch are those of a sane kernel."""
    script = ("from triton_adam import _tables as t; w, n, r = t.QUANT_NUM_WARPS, "
              "t.ALIGNED_QUANT_TILE_SIZE, t.ALIGNED_QUANT_MAX_REGISTERS; print(json.dumps("
              "{**k.kernel_stats('fp32', 'int8', w, n, 90, r), "
              "**k.tile_stats('fp32', 'int8', w, n, 90, r)}))")
    stats = _compiled_stats(script)
    # one tile a program, partial tiles in pieces: 3 programs of 8 warps fit an SM
    assert stats["spill_bytes"] == 0 and 0 < stats["registers"] <= 80
    assert stats["elements_per_thread"] == 8 and stats["programs_per_sm"] >= 3
    assert 60 < stats["instructions_per_element"] < 200
    # an AMP scale's division of the grad is code that a unit scale skips
    assert stats["instructions_per_element"] < stats["instructions_per_element_amp"]


@pytest.mark.aot  # compiles for a GPU target: with the other compile tests, last
def test_kernel_stats_stochastic_rounding_costs_a_few_instructions_over_pure_bf16():
    """One Philox call serves 8 elements: stochastic rounding's tile is pure bfloat16's plus
    a small constant (about 11 an element on sm_90; a call per element cost 58), in the
    same registers; and the H200 model's arithmetic."""
    script = ("print(json.dumps([{**k.kernel_stats('bf16', 'none', 8, 2048, 90, None, 'bf16', "
              "'none', sr), **k.tile_stats('bf16', 'none', 8, 2048, 90, None, 'bf16', 'none', "
              "sr)} for sr in (False, True)]))")
    plain, sr = _compiled_stats(script)
    assert 0 < sr["instructions_per_element"] - plain["instructions_per_element"] < 16
    assert sr["registers"] <= plain["registers"] + 8 and sr["spill_bytes"] == 0
    assert sr["programs_per_sm"] == plain["programs_per_sm"]
    assert plain["bytes_per_element"] == sr["bytes_per_element"] == 14
    kernel_stats = _load("kernel_stats")
    # 112.4 instructions over 1.236e9 params: 4.2 ms to issue; 16.06 B each: 4.6 ms to move
    model = kernel_stats.issue_model(112.4, 16.06, 1.236e9)
    assert (model["issue_ms"], model["bytes_ms"]) == (4.15, 4.62)

