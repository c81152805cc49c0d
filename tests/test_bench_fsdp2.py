"""The FSDP2 host-time benchmark runs a real gloo world and reports every provider."""
import json
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from triton_adam.bench.fsdp2 import PROVIDERS, Fsdp2BenchConfig, _join_within, run
from triton_adam.cli import main

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch built without distributed/gloo support")


def test_fsdp2_host_time_rows():
    record = run(Fsdp2BenchConfig(world_size=2, layers=6, warmup=1, repeats=3))
    assert record["config"]["tensors"] == 24
    rows = {r["provider"]: r for r in record["results"]}
    assert set(rows) == set(PROVIDERS)
    for row in rows.values():
        assert row["repeats"] == 3
        assert 0 < row["min_ms"] <= row["host_median_ms"]
        assert row["us_per_tensor"] == pytest.approx(1e3 * row["host_median_ms"] / 24)
    assert rows["torch fused"]["torch_fused_over_this"] == pytest.approx(1.0)


def test_cli_bench_fsdp2_writes_json(tmp_path, capsys):
    path = tmp_path / "fsdp2.json"
    assert main(["bench", "--fsdp2", "1", "--quick", "--steps", "2", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["config"]["world_size"] == 1 and record["run"]["device"]
    assert "torch fused" in capsys.readouterr().out


def test_cli_bench_fsdp2_refuses_a_bad_world_size(capsys):
    assert main(["bench", "--fsdp2", "0"]) == 1
    assert "world size" in capsys.readouterr().out


def test_a_world_past_its_time_is_killed_not_waited_for():
    # Rank r sleeps r seconds: ranks 1-3 are still running at the deadline.
    context = mp.start_processes(time.sleep, nprocs=4, start_method="spawn", join=False)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish in 0.5 s"):
        _join_within(context, 0.5)
    assert time.monotonic() - start < 10
    assert not any(process.is_alive() for process in context.processes)
