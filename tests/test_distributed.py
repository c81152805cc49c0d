"""triton-adam under torch.distributed: FSDP2, HSDP, FSDP x TP, DCP, DDP, ZeRO, on CPU with gloo.

The scenarios (tests/dist_scenarios.py) run in spawned worlds of 1 to 4 processes talking over
loopback; each world runs its scenarios in one set of processes, with both backends (torch's
fused kernels and the Triton kernels through the interpreter), against torch's fused AdamW/Adam
in the same set-up. A checkpoint saved by the 2-process world is loaded by a 1- and a 3-process
world (resharding).
"""
import tempfile

import pytest
import torch.distributed as dist

from dist_harness import failures, run_world

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch built without distributed/gloo support")

MODULE = "dist_scenarios"
WORLD_2 = [
    "fsdp2_uneven_and_empty_shards",
    "fsdp2_shard1_placement",
    "mixed_tensor_and_dtensor_group",
    "partial_grads_are_redistributed",
    "clip_matches_torch_on_1d_mesh",
    "clip_grad_norm_function_on_dtensors",
    "inf_on_one_rank_skips_everywhere",
    "replaced_parameter_raises",
    "dcp_warmup_leaves_params_unchanged",
    "ddp_bucket_views_and_set_to_none",
    "zero_redundancy_with_an_empty_rank",
    "readme_fsdp2_example",
    "dcp_save",  # last: the load worlds below read what it wrote
]
WORLD_4 = ["hsdp_matches_torch_and_clips", "fsdp_tp_matches_torch_and_clips"]
LOAD = ["dcp_load_and_reshard"]


@pytest.fixture(scope="module")
def checkpoint_dir():
    with tempfile.TemporaryDirectory() as path:
        yield path


@pytest.fixture(scope="module")
def world_2(checkpoint_dir):
    return run_world(2, MODULE, WORLD_2, checkpoint_dir)


@pytest.fixture(scope="module")
def world_4(checkpoint_dir):
    return run_world(4, MODULE, WORLD_4, checkpoint_dir)


@pytest.mark.parametrize("scenario", WORLD_2)
def test_two_ranks(world_2, scenario):
    problems = failures(world_2, scenario, 2)
    assert not problems, problems


@pytest.mark.parametrize("scenario", WORLD_4)
def test_four_ranks(world_4, scenario):
    problems = failures(world_4, scenario, 4)
    assert not problems, problems


@pytest.mark.parametrize("world_size", [1, 3])
def test_checkpoint_saved_on_two_ranks_loads_on(world_2, checkpoint_dir, world_size):
    assert not failures(world_2, "dcp_save", 2), "the 2-rank save failed"
    outcome = run_world(world_size, MODULE, LOAD, checkpoint_dir)
    problems = failures(outcome, LOAD[0], world_size)
    assert not problems, problems
