"""Tests of the ``triton-adam`` command: argument handling, exit codes, what it prints."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from triton_adam import cli
from triton_adam.bench import kernel_report, parity, report, timing

REPO = Path(__file__).resolve().parents[1]


def _env_without_interpret():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env



# Timing values are not asserted; one thread keeps these tests quick on a busy 2-core box.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture
def small_copy(monkeypatch):
    monkeypatch.setattr(timing, "default_copy_bytes", lambda device: 8 * 2**20)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in ("bench", "kernels", "check", "experiments"):
        assert sub in out


def test_bench_quick_default_runs_as_module(tmp_path):
    """What CI runs: ``python -m triton_adam bench --quick`` on the CPU default preset
    (``--device cpu`` so a GPU machine running the suite stays on the CPU path)."""
    out = tmp_path / "run.json"
    plot = tmp_path / "run.png"
    proc = subprocess.run(
        [sys.executable, "-m", "triton_adam", "bench", "--quick", "--device", "cpu", "--threads", "1", "--json", str(out), "--plot", str(plot)],
        cwd=tmp_path, env=_env_without_interpret(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert report.validate_record(record) == []
    assert record["config"]["presets"] == ["gpt2-small-cpu"]
    assert record["config"]["quick"] is True
    assert record["config"]["threads"] == 1
    statuses = {r["provider"]: r["status"] for r in record["results"]}
    assert statuses["fused"] == "ok" and statuses["forloop"] == "ok" and statuses["foreach"] == "ok"
    # Every provider appears once, measured or with its reason.
    assert set(statuses) == set(record["config"]["providers"])
    for r in record["results"]:
        if r["status"] == "skipped":  # listed under the table with its reason, never silently
            assert r["reason"] and f"skipped {r['provider']}: {r['reason']}" in proc.stdout
    assert "copy bandwidth" in proc.stdout and "fused" in proc.stdout
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_bench_options_reach_the_record(tmp_path, small_copy, capsys):
    out = tmp_path / "r.json"
    rc = cli.main(["bench", "--quick", "--preset", "smoke-cpu,vit-tiny-cpu", "--dtype", "bf16",
                   "--optimizer", "adam", "--amsgrad", "--providers", "forloop,fused",
                   "--device", "cpu", "--steps", "2", "--json", str(out)])
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["config"]["optimizer"]["kind"] == "adam"
    assert record["config"]["optimizer"]["amsgrad"] is True
    assert record["config"]["repeats"] == 2
    assert [(r["preset"], r["dtype"], r["provider"]) for r in record["results"]] == [
        ("smoke-cpu", "bf16", "forloop"), ("smoke-cpu", "bf16", "fused"),
        ("vit-tiny-cpu", "bf16", "forloop"), ("vit-tiny-cpu", "bf16", "fused"),
    ]
    assert "Adam step" in capsys.readouterr().out


def test_bench_clip_reaches_record_and_title(tmp_path, small_copy, capsys):
    out = tmp_path / "clip.json"
    rc = cli.main(["bench", "--quick", "--preset", "smoke-cpu", "--providers", "triton-adam,fused",
                   "--device", "cpu", "--steps", "2", "--clip", "1.0", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "clip max_norm=1" in text and "clip_grad_norm_" in text
    record = json.loads(out.read_text())
    assert record["config"]["clip"] is True and record["config"]["max_grad_norm"] == 1.0
    assert {r["provider"]: r["clip"] for r in record["results"]} == {
        "triton-adam": "fused", "fused": "clip_grad_norm_"}
    assert cli.main(["report", str(out)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "triton-adam" in line)
    assert " 1 " in row  # the clip column holds the max norm


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_bench_rejects_bad_clip(bad, capsys):
    assert cli.main(["bench", "--clip", bad, "--device", "cpu"]) == 1
    assert "--clip" in capsys.readouterr().out


def test_bench_rejects_unknown_preset(capsys):
    assert cli.main(["bench", "--preset", "nope", "--device", "cpu"]) == 1
    assert "unknown preset" in capsys.readouterr().out


def test_bench_list_presets(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "1,235,814,400" in out


def test_bench_ctrl_c_prints_partial_table(tmp_path, small_copy, monkeypatch, capsys):
    real = timing.time_steps
    calls = {"n": 0}

    def interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(timing, "time_steps", interrupt)
    out = tmp_path / "partial.json"
    rc = cli.main(["bench", "--quick", "--preset", "smoke-cpu", "--providers", "forloop,fused",
                   "--device", "cpu", "--json", str(out)])
    assert rc == cli.EXIT_INTERRUPTED
    text = capsys.readouterr().out
    assert "forloop" in text and "interrupted" in text.lower()
    record = json.loads(out.read_text())
    assert record["interrupted"] is True and len(record["results"]) == 1


def test_report_summarises_recorded_runs(tmp_path, small_copy, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--quick", "--preset", "smoke-cpu", "--providers", "fused",
                     "--device", "cpu", "--json", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 0
    assert "smoke-cpu" in capsys.readouterr().out


def test_report_reads_a_list_of_records(tmp_path, small_copy, capsys):
    """perf/gpu_check.sh gathers every bench of a run into one JSON list."""
    one = tmp_path / "one.json"
    assert cli.main(["bench", "--quick", "--preset", "smoke-cpu", "--providers", "fused",
                     "--device", "cpu", "--steps", "1", "--json", str(one)]) == 0
    record = json.loads(one.read_text())
    clipped = json.loads(json.dumps(record))
    clipped["config"].update(clip=True, max_grad_norm=0.5)
    both = tmp_path / "bench.json"
    both.write_text(json.dumps([record, clipped]))
    capsys.readouterr()
    assert cli.main(["report", str(both)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "smoke-cpu" in line]
    assert len(rows) == 2 and " - " in rows[0] and " 0.5 " in rows[1]


# ------------------------------------------------------------------ kernels
def test_kernels_prints_fake_compile_all(monkeypatch, capsys, tmp_path):
    from test_bench import FAKE_KERNELS

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # restored after the test
    seen = {}

    def fake_compile_all(target="sm_90", scope="all", **options):
        seen["target"] = target
        return FAKE_KERNELS

    monkeypatch.setattr(kernel_report, "load_compile_all", lambda: fake_compile_all)
    out = tmp_path / "k.json"
    assert cli.main(["kernels", "--target", "sm_80", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert seen["target"] == "sm_80"
    assert "adam_bf16_amsgrad" in text and "sm_80" in text
    assert json.loads(out.read_text())["kernels"][0]["name"] == "adam_fp32"


def test_kernels_without_aot_fails_clearly(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setitem(sys.modules, "triton_adam.aot", None)  # import now raises ImportError
    assert cli.main(["kernels"]) == cli.EXIT_UNAVAILABLE
    assert "triton_adam.aot" in capsys.readouterr().out


def test_kernels_refuses_to_compile_under_the_interpreter(monkeypatch, capsys):
    import triton  # noqa: F401  (already imported in this process by the optimizer tests)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.main(["kernels"]) == 1
    assert "TRITON_INTERPRET" in capsys.readouterr().out


def test_kernels_default_scope_is_the_plain_roles_and_filters_pick_roles():
    """`triton-adam kernels` alone compiles the plain roles (8, not 748); the role filters
    select among every specialisation; an unknown role value is refused by name."""
    from triton_adam import aot

    default = aot.kernel_jobs("default")
    assert len(default) == 8 and len(aot.kernel_jobs("all")) > 700
    roles = [aot.role_of(spec) for name, spec, _ in default if name == "adam_step_kernel"]
    assert {r["param"] for r in roles} == {"fp32", "bf16", "fp16"}
    assert all((r["state"], r["master"], r["amsgrad"], r["amp"]) == (r["param"], "none", "off",
                                                                      "none") for r in roles)
    sr = aot.kernel_jobs("all", {"param": ["bf16"], "master": ["sr"], "amsgrad": ["on"]})
    assert sr and all(spec["STOCHASTIC_ROUNDING"] and spec["AMSGRAD"]
                      and spec["PARAM_DTYPE"] == "bf16" for _, spec, _ in sr)
    int8 = aot.kernel_jobs("all", {"state": ["int8"]})
    assert int8 and all(aot.role_of(spec)["state"] == "int8" for _, spec, _ in int8)
    with pytest.raises(ValueError, match="choose from"):
        aot.kernel_jobs("all", {"master": ["fp64"]})


def test_kernels_compiles_a_filtered_role_in_parallel_with_progress(monkeypatch, capsys,
                                                                     tmp_path):
    """Two specialisations (fp32 plain, aligned or not) on two spawned compile processes,
    through the command; the report names the process count and each row compiled."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the spawned compilers inherit it
    out = tmp_path / "k.json"
    assert cli.main(["kernels", "--target", "sm_90", "--jobs", "2", "--param-dtype", "fp32",
                     "--state-dtype", "fp32", "--master", "none", "--amsgrad", "off",
                     "--amp", "none", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    record = json.loads(out.read_text())
    assert record["scope"] == "all" and record["filters"]["param"] == ["fp32"]
    rows = record["kernels"]
    assert [r["spec"]["ALIGNED"] for r in rows] == [True, False]
    assert all(r["registers"] > 0 and r["name"] == "adam_step_kernel" for r in rows)
    assert "2 specialisations" in captured.out


def test_kernels_refuses_an_unknown_role(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["kernels", "--master", "fp64"]) == 1
    assert "choose from" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("triton_adam.aot") is None,
                    reason="triton_adam.aot not written yet")
@pytest.mark.aot  # after tests/test_aot.py, whose compiles fill Triton's cache
def test_kernels_sm90_real(tmp_path):
    """Runs the lead's AOT compiler for sm_90 (no GPU needed) through the command."""
    out = tmp_path / "k.json"
    proc = subprocess.run(
        # the reduced set that tests/test_aot.py compiled before: Triton's cache has it
        [sys.executable, "-m", "triton_adam", "kernels", "--target", "sm_90", "--scope",
         "coverage", "--json", str(out)],
        env=_env_without_interpret(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["kernels"]
    assert rows, "compile_all returned no kernels"
    kernel_report.check_rows(rows)
    for r in rows:
        assert r["name"] in proc.stdout
        assert r["registers"] > 0 and r["ptx_bytes"] > 0


# ------------------------------------------------------------------ check
def test_check_with_stand_in_reference(monkeypatch, capsys, tmp_path):
    import torch

    make = lambda params, **kw: torch.optim.AdamW(params, foreach=False, **kw)  # noqa: E731
    monkeypatch.setattr(parity, "load_triton_adamw", lambda: (make, None))
    out = tmp_path / "c.json"
    assert cli.main(["check", "--device", "cpu", "--steps", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for d in ("fp32", "bf16", "fp16"):
        assert d in text
    assert len(json.loads(out.read_text())["results"]) == 3


def test_check_fails_when_errors_exceed_tolerance(monkeypatch, capsys):
    import torch

    make = lambda params, lr, weight_decay: torch.optim.AdamW(params, lr=3 * lr, weight_decay=weight_decay)  # noqa: E731
    monkeypatch.setattr(parity, "load_triton_adamw", lambda: (make, None))
    assert cli.main(["check", "--device", "cpu", "--dtype", "fp32", "--steps", "2"]) == 1
    assert "NO" in capsys.readouterr().out


def test_check_without_optimizer_fails_clearly(monkeypatch, capsys):
    monkeypatch.setattr(parity, "load_triton_adamw", lambda: (None, "AttributeError: no AdamW"))
    assert cli.main(["check", "--device", "cpu"]) == cli.EXIT_UNAVAILABLE
    assert "triton_adam.AdamW is not available" in capsys.readouterr().out


def test_check_real_triton_adam(capsys):
    make, reason = parity.load_triton_adamw()
    if make is None:
        pytest.skip(f"triton_adam.AdamW not available: {reason}")
    assert cli.main(["check", "--device", "cpu", "--steps", "3"]) == 0, capsys.readouterr().out


# ------------------------------------------------------------------ experiments
def test_experiments_without_sklearn_fails_clearly(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert cli.main(["experiments", "--quick"]) == cli.EXIT_UNAVAILABLE
    assert "scikit-learn" in capsys.readouterr().out


def test_experiments_calls_run_experiments(monkeypatch, capsys, tmp_path):
    import types

    calls = {}

    def fake_run(out_dir, quick):
        calls.update(out_dir=out_dir, quick=quick)
        return str(Path(out_dir) / "report.md")

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "sklearn" else real(name, *a))
    monkeypatch.setitem(sys.modules, "triton_adam.experiments",
                        types.SimpleNamespace(run_experiments=fake_run))
    assert cli.main(["experiments", "--quick", "--out", str(tmp_path)]) == 0
    assert calls == {"out_dir": str(tmp_path), "quick": True}
    assert "report.md" in capsys.readouterr().out


def test_bench_prints_plain_tables_without_rich(tmp_path, small_copy, monkeypatch, capsys):
    """The lent GPU machines may lack rich: tables then come out as plain aligned text."""
    from triton_adam.bench import console

    monkeypatch.setattr(console, "HAVE_RICH", False)
    out = tmp_path / "r.json"
    assert cli.main(["bench", "--quick", "--preset", "smoke-cpu", "--providers", "forloop,fused,apex",
                     "--device", "cpu", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(line for line in lines if line.startswith("preset"))
    assert "step ms" in header and "GB/s" in header
    assert any(line.startswith("smoke-cpu") and "fused" in line for line in lines)
    assert "skipped apex: ModuleNotFoundError: No module named 'apex'" in captured.out
    assert "[3/4]" in captured.err or "[4/4]" in captured.err  # plain progress lines
