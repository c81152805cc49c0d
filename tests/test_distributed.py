"""triton-adam under torch.distributed: FSDP2, HSDP, FSDP x TP, DCP, DDP, ZeRO, on CPU with gloo.

The scenarios (tests/dist_scenarios.py) run in spawned worlds of 1 to 4 processes talking over
loopback; each world runs its scenarios in one set of processes, with both backends (torch's
fused kernels and the Triton kernels through the interpreter), against torch's fused AdamW/Adam
in the same set-up (int8 states: against each rank's local shards stepped as plain tensors).
Checkpoints saved by the 2-process world are loaded by a 1- and a 3-process world (resharding).
"""
import tempfile

import pytest
import torch
import torch.distributed as dist

from dist_harness import failures, run_world

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch built without distributed/gloo support")

MODULE = "dist_scenarios"
WORLD_2 = [
    "fsdp2_uneven_and_empty_shards",
    "fsdp2_shard1_placement",
    "precision_rungs_on_fsdp2",
    "random_streams_are_unique_per_shard",
    "mixed_tensor_and_dtensor_group",
    "partial_grads_are_redistributed",
    "clip_matches_torch_on_1d_mesh",
    "clip_over_meshes_and_plain_tensors",
    "clip_grad_norm_function_on_dtensors",
    "inf_on_one_rank_skips_everywhere",
    "ranks_with_only_empty_shards_or_no_grads_join",
    "replaced_parameter_raises",
    "swapped_shards_are_followed",
    "dcp_warmup_leaves_params_unchanged",
    "ddp_bucket_views_and_set_to_none",
    "zero_redundancy_with_an_empty_rank",
    "readme_fsdp2_example",
    "int8_states_on_fsdp2",
    "fp8_states_on_fsdp2",
    "compact_state_dict_refused_on_fsdp2",
    # the saves last: the load worlds below read what they wrote
    "int8_dcp_save",
    "dcp_save",
]
WORLD_4 = ["hsdp_matches_torch_and_clips", "fsdp_tp_matches_torch_and_clips"]
# each load scenario: the 2-rank save it reads
LOAD = {"dcp_load_and_reshard": "dcp_save", "int8_dcp_load_and_reshard": "int8_dcp_save"}


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


@pytest.fixture(scope="module", params=[1, 3], ids=lambda n: f"{n}ranks")
def load_world(request, world_2, checkpoint_dir):
    """(world size, outcome): every load scenario in one world of that size."""
    return request.param, run_world(request.param, MODULE, list(LOAD), checkpoint_dir)


@pytest.mark.parametrize("scenario", list(LOAD))
def test_checkpoint_saved_on_two_ranks_loads_on(world_2, load_world, scenario):
    world_size, outcome = load_world
    assert not failures(world_2, LOAD[scenario], 2), f"the 2-rank {LOAD[scenario]} failed"
    problems = failures(outcome, scenario, world_size)
    assert not problems, problems


@pytest.mark.parametrize("rank", [0, 6, 7])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_world_of_eight_shapes_on_the_fake_process_group(rank, backend):
    """One rank of an 8-rank FSDP2 world, in this process (collectives are no-ops): Linear(5, 7)
    puts 1 row on ranks 0-6 and none on rank 7; Linear(30, 9): 2 rows on ranks 0-3, 1 on 4, none
    after. Shapes only (the collectives do nothing here): the local-shard steps, through the
    fused-clip path, match torch's fused AdamW on the same shards."""
    import copy

    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import triton_adam
    from conftest import backends_on

    if backend not in backends_on("cpu"):
        pytest.skip("the Triton kernels need the interpreter on CPU")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
    try:
        torch.manual_seed(rank)
        base = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(30, 9))
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (model, ref_model):
            fully_shard(m)
        rows = {0: [1, 2], 6: [1, 0], 7: [0, 0]}[rank]
        assert [p._local_tensor.shape[0] for p in model.parameters()][::2] == rows
        opt = triton_adam.AdamW(model.parameters(), lr=0.1, weight_decay=0.1, backend=backend,
                                max_grad_norm=1e9)
        ref = torch.optim.AdamW(ref_model.parameters(), lr=0.1, weight_decay=0.1, fused=True)
        generator = torch.Generator().manual_seed(100 + rank)
        for _ in range(3):
            for p, q in zip(model.parameters(), ref_model.parameters()):
                g = torch.randn(p._local_tensor.shape, generator=generator)
                p.grad = DTensor.from_local(g.clone(), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
                q.grad = DTensor.from_local(g.clone(), q.device_mesh, q.placements,
                                            shape=q.shape, stride=q.stride())
            opt.step()
            ref.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p._local_tensor, q._local_tensor, rtol=1e-6, atol=1e-7)
            assert float(opt.state[p]["step"]) == 3.0
        # a step that went through distribute_tensor (a resharded checkpoint) is read again as
        # a plain tensor: the kernels address it
        from torch.distributed.tensor import Replicate, distribute_tensor
        state = opt.state_dict()
        for s in state["state"].values():
            s["step"] = distribute_tensor(s["step"], p.device_mesh, [Replicate()])
        opt.load_state_dict(state)
        opt.step()
        assert all(type(s["step"]) is torch.Tensor and float(s["step"]) == 4.0
                   for s in opt.state.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_sharded_norms_of_16_bit_grads_are_float32(grad_dtype):
    """A one-rank FSDP2 world in this process (the fake process group): the fused clip's norm
    goes through the per-segment totals of the distributed path, which accumulate 16-bit grads
    in float32 on both backends (in the grads' dtype they were 1e-3 off for bfloat16, and inf
    for float16 grads whose norm passes 65504), within 32 float32 ulps of the exact norm.
    clip_grad_norm_'s torch-ops path for DTensors shares the totals."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import triton_adam
    from conftest import backends_on
    from triton_adam._torch_backend import segment_totals

    generator = torch.Generator().manual_seed(7)
    shapes = [(64, 48), (64,), (40, 64)]
    # elements well inside float16, norm ~2.4e5: past float16's largest value
    grads = [(torch.randn(s, generator=generator, dtype=torch.float64) * 3000).to(grad_dtype)
             for s in shapes]
    exact = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads]))
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        for backend in backends_on("cpu"):
            model = torch.nn.Sequential(torch.nn.Linear(48, 64), torch.nn.Linear(64, 40,
                                                                                bias=False))
            fully_shard(model.to(grad_dtype))
            params = list(model.parameters())
            opt = triton_adam.AdamW(params, lr=1e-2, max_grad_norm=1.0, backend=backend)
            for p, g in zip(params, grads):
                p.grad = DTensor.from_local(g.clone(), p.device_mesh, p.placements,
                                            shape=p.shape, stride=p.stride())
            opt.step()
            # 32 ulps: torch's float32 CPU norm drifts with size (test_clip_and_formulations)
            torch.testing.assert_close(opt.last_grad_norm.double(), exact, rtol=2 ** -18,
                                       atol=0, msg=lambda m: f"{backend}: {m}")
    finally:
        dist.destroy_process_group()
    segments = torch.tensor([0, 1, 0])
    for norm_type in (1.0, 2.0, float("inf")):
        totals, _ = segment_totals(grads, segments, 2, torch.device("cpu"), norm_type=norm_type)
        norms = [torch.linalg.vector_norm(g.double(), norm_type) for g in grads]
        if norm_type == float("inf"):
            expected = torch.stack([max(norms[0], norms[2]), norms[1]])
        else:
            expected = torch.stack([norms[0] ** norm_type + norms[2] ** norm_type,
                                    norms[1] ** norm_type])
        assert totals.dtype == torch.float32
        # p-th powers of float32 norms: p times the norm's rounding, plus the sum's
        torch.testing.assert_close(totals.double(), expected, rtol=2 ** -17, atol=0,
                                   msg=lambda m: f"norm {norm_type}: {m}")
