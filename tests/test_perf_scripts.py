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


def test_profile_step_runs_one_step_after_its_warm_up(capsys):
    """perf/gpu_check.sh wraps profile_step.py in ncu; without CUDA it still runs its steps."""
    profile_step = _load("profile_step")
    assert profile_step.main(["--preset", "smoke-cpu", "--dtype", "fp32", "--warmup", "1"]) == 0
    assert "profiled one step: smoke-cpu fp32" in capsys.readouterr().out


def test_peer_report_gives_each_peer_a_version_or_its_error(monkeypatch, tmp_path):
    """A peer that is missing or refuses the device is a row with the reason, never a crash."""
    from triton_adam.bench import providers as provs

    def refuses(cfg):
        def factory(params, c):
            raise NotImplementedError("needs a CUDA device")
        return factory

    fake = [provs.BY_NAME["fused"], provs.BY_NAME["apex"],
            provs.Provider("refuser", "refuses the device", refuses, "torch")]
    monkeypatch.setattr(provs, "PROVIDERS", fake)
    monkeypatch.setitem(sys.modules, "apex", None)  # import now raises ImportError
    peer_report = _load("peer_report")
    out = tmp_path / "peers.json"
    assert peer_report.main(["--device", "cpu", "--json", str(out)]) == 0
    rows = {row["provider"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"apex", "refuser"}  # torch's own optimizers are no peers
    assert rows["apex"]["version"] is None and "Error" in rows["apex"]["step"]
    assert rows["refuser"]["step"] == "NotImplementedError: needs a CUDA device"


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


# --- dense_tune.py: the dense kernel's launch sweep (timed on a GPU only) ---

def test_dense_tune_lists_its_candidates_without_a_gpu(capsys):
    dense_tune = _load("dense_tune")
    candidates = dense_tune.parse_candidates(None)
    assert candidates[0] == (_tables.NUM_WARPS, _tables.BLOCK_SIZE, _tables.ALIGNED_TILE_SIZE)
    assert len(set(candidates)) == len(candidates) > dense_tune.QUICK_CANDIDATES
    assert dense_tune.parse_candidates(None, quick=True) == \
        candidates[:dense_tune.QUICK_CANDIDATES]
    assert dense_tune.parse_candidates("4x2048/1024, 8X8192/2048") == [(4, 2048, 1024),
                                                                        (8, 8192, 2048)]
    for bad in ("8x4096", "8x2048/4096", "8x4096/128", "3x4096/2048", "1x8192/8192"):
        with pytest.raises(ValueError):
            dense_tune.parse_candidates(bad)
    assert dense_tune.main(["--dry-run"]) == 0
    listed = capsys.readouterr().out
    assert all(dense_tune.label(c) in listed for c in candidates)
    assert "(the current default)" in listed


def test_dense_tune_says_it_needs_cuda(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    dense_tune = _load("dense_tune")
    assert dense_tune.main(["--out", str(tmp_path / "dense_tune"), "--quick"]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "dense_tune").exists()


def test_each_dense_candidate_launches_as_set_and_gives_the_defaults_numbers(monkeypatch):
    """Every candidate's kernels run through the interpreter with its warps, block and tile,
    and step float32 and bfloat16 params (several tiles, a partial one, an unaligned view) to
    the default launch's bits; the table is restored after."""
    import torch
    import triton_adam

    dense_tune = _load("dense_tune")
    launched = []
    launch = adam_step.launch_adam_step

    def recording(*args, **kwargs):
        launched.append((args[10], args[8], args[9]))  # warps, block, tile
        return launch(*args, **kwargs)

    monkeypatch.setattr(adam_step, "launch_adam_step", recording)
    generator = torch.Generator().manual_seed(3)
    starts = [torch.randn(n, generator=generator) for n in (9000, 4099)]
    grads = [[torch.randn(s.shape, generator=generator) for s in starts] for _ in range(2)]

    def stepped(dtype):
        params = [torch.nn.Parameter(s.to(dtype, copy=True)) for s in starts]
        # a view one element into its storage: unaligned
        params.append(torch.nn.Parameter(starts[1].to(dtype, copy=True)[1:]))
        opt = triton_adam.AdamW(params, lr=1e-2, weight_decay=0.1, backend="triton")
        for step_grads in grads:
            for p, g in zip(params, step_grads + [step_grads[1][1:]]):
                p.grad = g.to(dtype)
            opt.step()
        return [p.detach().clone() for p in params] + [
            opt.state[p][key].clone() for p in params for key in ("exp_avg", "exp_avg_sq")]

    default = dense_tune.current()
    expected = {dtype: stepped(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for candidate in dense_tune.parse_candidates(None)[1:]:
        launched.clear()
        with dense_tune.launch(candidate):
            for dtype in (torch.float32, torch.bfloat16):
                got = stepped(dtype)
                assert all(torch.equal(a, b) for a, b in zip(got, expected[dtype])), candidate
        warps, block, tile = candidate
        assert (warps, block, tile) in launched  # the aligned bucket
        assert all(w == warps and b == block for w, b, _ in launched)
    assert dense_tune.current() == default


def test_host_floor_times_every_pass_for_each_kind_of_grads(tmp_path, capsys):
    """perf/host_floor.py: each kind of grads in a process of its own, every pass timed."""
    host_floor = _load("host_floor")
    out = tmp_path / "floor.json"
    assert host_floor.main(["--tensors", "64", "--repeats", "3", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["ns_per_tensor"]
    assert set(figures) == set(host_floor.KINDS)
    for kind, passes in figures.items():
        assert {"p.grad", "param data_ptr", "grad data_ptr", "tensor guard"} <= set(passes)
        assert all(value > 0 for value in passes.values()), (kind, passes)
    assert "backward grads" in capsys.readouterr().out
