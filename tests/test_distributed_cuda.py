"""The distributed path on a GPU: DTensor params of FSDP2 and collectives on NCCL, in a world of
one process (this one), each against torch's fused AdamW (or our own rung on plain tensors) in
the same set-up.

The ``cuda`` cases run the Triton kernels on NCCL (perf/gpu_check.sh runs them on the lent GPU;
skipped without CUDA). Each scenario also runs on the CPU over gloo, with the torch backend and
with the kernels through the interpreter: the same DTensor, redistribution, clip, skip and
checkpoint code, so the CPU suite keeps these scenarios working between GPU runs
(tests/test_distributed.py covers worlds of several ranks).
"""
import copy
import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn

import triton_adam
from conftest import backends_on

WORLDS = [
    pytest.param(("cuda", "nccl", "triton"), id="cuda-nccl-triton",
                 marks=[pytest.mark.cuda,
                        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    pytest.param(("cpu", "gloo", "torch"), id="cpu-gloo-torch"),
    pytest.param(("cpu", "gloo", "triton"), id="cpu-gloo-triton"),
]
STEPS = 3


@pytest.fixture
def world(request, tmp_path):
    """(device, optimizer backend, device mesh) of a one-process world over a file store."""
    from torch.distributed.device_mesh import init_device_mesh

    device, process_group, backend = request.param
    if backend not in backends_on(device):
        pytest.skip("the Triton kernels need the interpreter on CPU")
    if not (dist.is_available() and getattr(dist, f"is_{process_group}_available")()):
        pytest.skip(f"torch built without {process_group}")
    dist.init_process_group(process_group, init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield device, backend, init_device_mesh(device, (1,))
    finally:
        gc.collect()  # FSDP2's reference cycles, before the group goes (see bench/fsdp2.py)
        dist.destroy_process_group()


def local(t):
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def _model(device, mesh, seed=0, dtype=torch.float32):
    """Two sharded layers (a tile-sized one for the kernels) and their unsharded twin."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(33, 300), nn.ReLU(), nn.Linear(300, 7)).to(device, dtype)
    model, twin = copy.deepcopy(base), copy.deepcopy(base)
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, twin


def _batch(device, step, dtype=torch.float32):
    return torch.randn(4, 33, generator=torch.Generator().manual_seed(step)).to(device, dtype)


def _assert_close(ours, theirs, what, **tolerance):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(local(p), local(q), **tolerance,
                                   msg=lambda m: f"{what} param {i}: {m}")


@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_fsdp2_fused_clip_and_skip_match_torch_fused(world):
    """FSDP2 with the fused clip and skip_nonfinite against clip_grad_norm_ + torch fused AdamW;
    an inf grad skips the whole step (params and states untouched), the next step goes on."""
    device, backend, mesh = world
    model, _ = _model(device, mesh)
    ref_model, _ = _model(device, mesh)
    opt = triton_adam.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, backend=backend,
                            max_grad_norm=0.05, skip_nonfinite=True)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1, fused=True)
    for step in range(STEPS):
        for m in (model, ref_model):
            m(_batch(device, step)).square().mean().backward()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
        ref.step()
        assert float(norm.full_tensor()) > 0.05, "the test must clip"
        torch.testing.assert_close(opt.last_grad_norm.float().cpu(),
                                   norm.full_tensor().float().cpu(), rtol=1e-5, atol=0)
        _assert_close(model.parameters(), ref_model.parameters(), f"{backend} step {step}",
                      rtol=1e-4, atol=1e-5)  # the fused clip rounds its factor once
        opt.zero_grad()
        ref.zero_grad()
    model(_batch(device, 9)).square().mean().backward()
    local(model[0].weight.grad).view(-1)[-1] = float("inf")
    before = [local(p).clone() for p in model.parameters()]
    states = [{k: local(v).clone() for k, v in opt.state[p].items()} for p in model.parameters()]
    opt.step()
    assert bool(opt.last_step_skipped)
    for p, b, s in zip(model.parameters(), before, states):
        assert torch.equal(local(p), b)
        assert all(torch.equal(local(opt.state[p][k]), v) for k, v in s.items())
    opt.zero_grad()
    for m in (model, ref_model):
        m(_batch(device, 10)).square().mean().backward()
    opt.step()
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
    ref.step()
    assert not bool(opt.last_step_skipped)
    _assert_close(model.parameters(), ref_model.parameters(), f"{backend} after the skip",
                  rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_partial_grads_are_redistributed_like_torch_fused(world):
    """Replicated params with Partial(sum) grads (sequence parallel's LayerNorm): reduced to the
    param's placements before the step, as torch's DTensor dispatch does for its fused AdamW."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    device, backend, mesh = world
    generator = torch.Generator().manual_seed(3)
    starts = [torch.randn(n, generator=generator).to(device) for n in (37, 4100)]
    ours = [nn.Parameter(DTensor.from_local(s.clone(), mesh, [Replicate()])) for s in starts]
    theirs = [nn.Parameter(DTensor.from_local(s.clone(), mesh, [Replicate()])) for s in starts]
    opt = triton_adam.AdamW(ours, lr=0.1, backend=backend)
    ref = torch.optim.AdamW(theirs, lr=0.1, fused=True)
    for _ in range(STEPS):
        for p, q in zip(ours, theirs):
            g = torch.randn(p.shape, generator=generator).to(device)
            p.grad = DTensor.from_local(g.clone(), mesh, [Partial()])
            q.grad = DTensor.from_local(g.clone(), mesh, [Partial()])
        opt.step()
        ref.step()
    _assert_close(ours, theirs, backend, rtol=1e-6, atol=1e-7)
    assert all(opt.state[p]["exp_avg"].placements == (Replicate(),) for p in ours)


def _train(model, opt, device, steps):
    for step in steps:
        model(_batch(device, step)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _dcp_round_trip(model, opt, folder, fresh_model, fresh_opt):
    """Save (model, opt) with DCP and load the checkpoint into the fresh pair."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder))
    model_sd, optim_sd = get_state_dict(fresh_model, fresh_opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(fresh_model, fresh_opt, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])


@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_dcp_save_and_load_continue_like_torch_fused(world, tmp_path):
    """Two steps, a DCP save, a load into a fresh model and optimizer: the loaded states equal
    the saved ones, and the next step equals the uninterrupted run's (bit for bit) and torch
    fused AdamW's after the same round trip."""
    device, backend, mesh = world
    make = {"ours": lambda ps: triton_adam.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True,
                                                 backend=backend),
            "torch": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True,
                                                  fused=True)}
    runs = {}
    for name, build in make.items():
        model, _ = _model(device, mesh, seed=8)
        opt = build(model.parameters())
        _train(model, opt, device, range(2))
        loaded, _ = _model(device, mesh, seed=99)
        loaded_opt = build(loaded.parameters())
        _dcp_round_trip(model, opt, tmp_path / name, loaded, loaded_opt)
        for p, q in zip(model.parameters(), loaded.parameters()):
            assert torch.equal(local(p), local(q))
            for key, value in opt.state[p].items():
                assert torch.equal(local(loaded_opt.state[q][key]).cpu(),
                                   local(value).cpu()), f"{name} {key}"
        _train(model, opt, device, [2])
        _train(loaded, loaded_opt, device, [2])
        for p, q in zip(model.parameters(), loaded.parameters()):
            assert torch.equal(local(p), local(q)), f"{name}: the loaded run went elsewhere"
        runs[name] = loaded
    _assert_close(runs["ours"].parameters(), runs["torch"].parameters(), backend,
                  rtol=1e-5, atol=1e-6)


RUNGS = [dict(master_weights="compact"), dict(master_weights=True),
         dict(kahan_summation=True), dict(stochastic_rounding=True, seed=3)]


@pytest.mark.parametrize("rung", RUNGS, ids=lambda r: next(iter(r)) + "=" + str(next(iter(
    r.values()))))
@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_precision_rungs_on_dtensor_params(world, rung):
    """bf16 FSDP2 params with each precision rung step bit for bit as the same rung on the
    unsharded twin; with float32 masters, they stay within a bf16 rounding of torch fused
    AdamW stepping float32 copies."""
    from torch.distributed.tensor import DTensor

    device, backend, mesh = world
    model, twin = _model(device, mesh, seed=4, dtype=torch.bfloat16)
    fp32 = copy.deepcopy(twin).float()
    opt = triton_adam.AdamW(model.parameters(), lr=0.01, backend=backend, **rung)
    ref = triton_adam.AdamW(twin.parameters(), lr=0.01, backend=backend, **rung)
    torch_ref = torch.optim.AdamW(fp32.parameters(), lr=0.01, fused=True)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(step)
        for p, q, r in zip(model.parameters(), twin.parameters(), fp32.parameters()):
            full = torch.randn(q.shape, generator=generator).to(device)
            q.grad = full.to(torch.bfloat16)
            r.grad = full.to(torch.bfloat16).float()
            p.grad = DTensor.from_local(full.to(torch.bfloat16), mesh, p.placements,
                                        shape=p.shape, stride=p.stride())
        opt.step()
        ref.step()
        torch_ref.step()
    for p, q, r in zip(model.parameters(), twin.parameters(), fp32.parameters()):
        assert torch.equal(local(p).view(torch.int16), q.view(torch.int16)), rung
        if rung.get("master_weights") is True:
            torch.testing.assert_close(local(p).float(), r.detach().bfloat16().float(),
                                       rtol=0, atol=float(r.detach().abs().max()) * 2 ** -7)


@pytest.mark.parametrize("world", WORLDS, indirect=True)
def test_int8_moments_on_dtensor_params(world):
    """int8 moments of FSDP2 params: params, codes and scales bit for bit those of the same
    tensors stepped as plain params (the blocks are the local shard's), and near torch fused
    AdamW's float32 moments."""
    device, backend, mesh = world
    model, twin = _model(device, mesh, seed=5)
    ref_model = copy.deepcopy(twin)
    options = dict(lr=0.01, weight_decay=0.1, state_dtype="int8", backend=backend)
    opt = triton_adam.AdamW([{"params": list(model.parameters()), "min_quantized_numel": 4096}],
                            **options)
    plain = triton_adam.AdamW([{"params": list(twin.parameters()),
                                "min_quantized_numel": 4096}], **options)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01, weight_decay=0.1, fused=True)
    for step in range(STEPS):
        for m in (model, twin, ref_model):
            m(_batch(device, step)).square().mean().backward()
        for o in (opt, plain, ref):
            o.step()
            o.zero_grad()
    assert "exp_avg_scale" in opt.state[model[0].weight], "the 33x300 weight is quantised"
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(local(p), q.detach())
        for key, value in plain.state[q].items():
            assert torch.equal(local(opt.state[p][key]).cpu(), local(value).cpu()), key
    _assert_close(model.parameters(), ref_model.parameters(), "int8 vs fused fp32",
                  rtol=0, atol=STEPS * 0.01 * 0.25)
