"""Distributed scenarios, run on every rank of a spawned gloo world (see dist_harness.py).

Each function takes (rank, world_size, shared_dir) and raises on failure. The reference is
``torch.optim.AdamW(fused=True)`` (or Adam) in the same distributed set-up, stepped on the same
grads: the torch backend must match it bit for bit, the Triton kernels (interpreter) within the
documented last-bit difference (torch's CPU kernel rounds the last numel % 8 elements of
exp_avg_sq without an fma: an ulp, which can move a param by an ulp or so over a few steps).
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

import triton_adam

BACKENDS = ("torch", "triton")
STEPS = 3
# Triton (interpreter) vs torch's fused CPU kernel, per element, in float32 ulps of the larger.
TRITON_ULPS = 8


def local(t):
    return t._local_tensor if isinstance(t, DTensor) else t


def assert_same(ours, theirs, backend, what):
    """Bit-equal for the torch backend, within TRITON_ULPS for the Triton kernels."""
    a, b = local(ours).detach(), local(theirs).detach()
    assert a.shape == b.shape, f"{what}: local shapes {tuple(a.shape)} vs {tuple(b.shape)}"
    if backend == "torch":
        assert torch.equal(a, b), f"{what}: max diff {(a - b).abs().max() if a.numel() else 0}"
        return
    if a.numel() == 0:
        return
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(torch.finfo(a.dtype).tiny)
    ulps = ((a - b).abs() / (scale * torch.finfo(a.dtype).eps)).max().item()
    assert ulps <= TRITON_ULPS, f"{what}: {ulps:.1f} ulps apart"


def assert_states_match(opt, ref, ours_params, ref_params, backend, what=""):
    for i, (p, q) in enumerate(zip(ours_params, ref_params)):
        assert_same(p, q, backend, f"{what}param {i}")
        s, r = opt.state[p], ref.state[q]
        assert set(s) == set(r), f"{what}param {i}: state keys {sorted(s)} vs {sorted(r)}"
        for key in r:
            if key == "step":
                assert float(s[key]) == float(r[key]), f"{what}param {i}: step"
                assert not isinstance(s[key], DTensor)
                continue
            assert type(s[key]) is type(r[key]), f"{what}param {i}: {key} {type(s[key])}"
            if isinstance(r[key], DTensor):
                assert s[key].placements == r[key].placements, f"{what}param {i}: {key} placements"
                assert s[key].device_mesh == r[key].device_mesh
                assert s[key].shape == r[key].shape
            assert_same(s[key], r[key], backend, f"{what}param {i} {key}")


def fresh_grads(params, seed):
    """Replace each param's grad with new random values (DTensor grads keep their spec)."""
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        if p.grad is None:
            continue
        values = torch.randn(local(p.grad).shape, generator=generator)
        local(p.grad).copy_(values)


def groups_by_kind(params):
    """Param groups for torch's fused AdamW, which refuses groups mixing plain tensors and
    DTensors, or DTensors of different meshes: one group per mesh (and one of plain tensors)."""
    kinds = {}
    for p in params:
        kinds.setdefault(p.device_mesh if isinstance(p, DTensor) else None, []).append(p)
    return [{"params": ps} for ps in kinds.values()]


def two_layer(seed=0):
    torch.manual_seed(seed)
    # Linear(5, 7): shards of 4 and 3 rows on 2 ranks; Linear(7, 1): rank 1's shard is empty
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 1))


def train_pair(model, ref_model, make_opt, make_ref, rank, steps=STEPS, inputs=5, check=None):
    """Train both models on the same per-rank batches; return (opt, ref)."""
    opt, ref = make_opt(model.parameters()), make_ref(ref_model.parameters())
    for step in range(steps):
        generator = torch.Generator().manual_seed(1000 * step + rank)
        x = torch.randn(3, inputs, generator=generator)
        for m in (model, ref_model):
            m(x).square().mean().backward()
        same_grads(model, ref_model)
        for m, o in ((model, opt), (ref_model, ref)):
            o.step()
            if check is not None:
                check(m, o)
            o.zero_grad()
    return opt, ref


def same_grads(model, ref_model):
    """Give the reference model our model's grads, bit for bit: gloo adds a reduction's
    contributions in the order they arrive, so two backward passes on a loaded machine can
    differ in the last bits, which Adam's first steps magnify (37 ulps seen in exp_avg under
    FSDP x TP); the optimizers are what is compared, on the same inputs."""
    for p, q in zip(model.parameters(), ref_model.parameters()):
        if p.grad is not None and q.grad is not None:
            local(q.grad).copy_(local(p.grad))


# --- FSDP2 -------------------------------------------------------------------------------------

def fsdp2_uneven_and_empty_shards(rank, world_size, shared_dir):
    for backend in BACKENDS:
        for amsgrad in (False, True):
            base = two_layer()
            model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
            for m in (model, ref_model):
                fully_shard(m[0])
                fully_shard(m[2])
                fully_shard(m)
            shards = [tuple(local(p).shape) for p in model.parameters()]
            if world_size == 2:
                expected = [[(4, 5), (4,), (1, 7), (1,)], [(3, 5), (3,), (0, 7), (0,)]][rank]
                assert shards == expected, shards
            opt, ref = train_pair(
                model, ref_model,
                lambda ps: triton_adam.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=amsgrad,
                                             backend=backend),
                lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=amsgrad,
                                             fused=True),
                rank)
            assert_states_match(opt, ref, list(model.parameters()), list(ref_model.parameters()),
                                backend, f"{backend} amsgrad={amsgrad}: ")


def precision_rungs_on_fsdp2(rank, world_size, shared_dir):
    """bfloat16 params under FSDP2 (uneven and empty shards) with each precision rung: the
    master remainder and the Kahan compensation are DTensors with the param's placements, the
    state_dict's master a float32 DTensor, and the gathered params (and masters) are bit for
    bit those of the same rung on the unsharded model fed the full grads: the step is
    elementwise, and stochastic rounding draws by global element index where every shard of
    the param starts at a multiple of 8 (its Philox calls serve 8 elements each); a param with
    a shard that does not (Linear(5, 7)'s: rank 1 starts at 20, its bias at 4) draws a stream
    of its own, the same on both backends."""
    from triton_adam import _distributed, _precision

    sr_bits = {}

    rungs = [dict(master_weights="compact"), dict(master_weights=True),
             dict(kahan_summation=True), dict(stochastic_rounding=True, seed=3)]
    for backend in BACKENDS:
        for rung in rungs:
            base = two_layer(seed=4).to(torch.bfloat16)
            model, plain = copy.deepcopy(base), copy.deepcopy(base)
            fully_shard(model[0])
            fully_shard(model[2])
            fully_shard(model)
            opt = triton_adam.AdamW(model.parameters(), lr=0.01, backend=backend, **rung)
            ref = triton_adam.AdamW(plain.parameters(), lr=0.01, backend=backend, **rung)
            for step in range(STEPS):
                generator = torch.Generator().manual_seed(step)  # the same on every rank
                for p, q in zip(model.parameters(), plain.parameters()):
                    full = torch.randn(q.shape, generator=generator).to(torch.bfloat16)
                    q.grad = full.clone()
                    p.grad = DTensor.from_local(_shard_of(full, p).clone(), p.device_mesh,
                                                p.placements, shape=p.shape, stride=p.stride())
                opt.step()
                ref.step()
            what = f"{backend} {rung}"
            for index, (p, q) in enumerate(zip(model.parameters(), plain.parameters())):
                offsets = [None] * world_size
                dist.all_gather_object(offsets, _distributed.random_stream(p)[0])
                gathered = p.full_tensor().view(torch.int16)
                if rung.get("stochastic_rounding") and any(o % 8 for o in offsets):
                    sr_bits.setdefault(index, []).append(gathered)
                else:
                    assert torch.equal(gathered, q.view(torch.int16)), what
                key = next((k for k in _precision.EXTRA_KEYS.values() if k in opt.state[p]),
                           None)
                if key is not None:
                    extra = opt.state[p][key]
                    assert isinstance(extra, DTensor) and extra.placements == p.placements, what
                    # (compared shard by shard: gloo cannot gather int16)
                    assert torch.equal(local(extra), _shard_of(ref.state[q][key], p)), what
            if rung.get("master_weights") == "compact":  # fp32 moments + int16 remainder
                local_numel = sum(local(p).numel() for p in model.parameters())
                assert opt.state_bytes() == 10 * local_numel, what
            saved = opt.state_dict()["state"]
            if rung.get("master_weights"):
                masters = [s["master_param"] for s in saved.values()]
                assert all(isinstance(m, DTensor) and m.dtype == torch.float32 for m in masters)
    assert sorted(sr_bits) == [0, 1]  # Linear(5, 7)'s weight and bias
    assert all(torch.equal(*by_backend) for by_backend in sr_bits.values())


def random_streams_are_unique_per_shard(rank, world_size, shared_dir):
    """Stochastic rounding's counters: a dim-0 shard counts by global element index (shard 0),
    so it draws what the unsharded param draws (where it starts at a multiple of 8, see
    precision_rungs_on_fsdp2); a dim-1 shard (not one run of the global
    order) gets its own shard number, so no two elements share a counter; both backends
    round such a shard alike."""
    from torch.distributed.tensor import distribute_tensor

    from triton_adam import _distributed

    mesh = init_device_mesh("cpu", (world_size,))
    full = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    rows = distribute_tensor(full, mesh, [Shard(0)], src_data_rank=None)
    columns = distribute_tensor(full, mesh, [Shard(1)], src_data_rank=None)
    assert _distributed.random_stream(rows) == (rank * 3 * 4, 0)
    assert _distributed.random_stream(columns) == (0, 1 + rank)
    for sharded in (rows, columns):  # every rank's (element, shard) counters: all distinct
        streams = [None] * world_size
        dist.all_gather_object(streams, _distributed.random_stream(sharded))
        counters = {(offset + i, shard) for offset, shard in streams
                    for i in range(local(sharded).numel())}
        assert len(counters) == 6 * 4, streams
    bits = {}
    for backend in BACKENDS:
        param = nn.Parameter(distribute_tensor(full.to(torch.bfloat16), mesh, [Shard(1)],
                                               src_data_rank=None))
        opt = triton_adam.AdamW([param], lr=0.01, backend=backend, stochastic_rounding=True,
                                seed=2)
        param.grad = distribute_tensor(torch.ones(6, 4, dtype=torch.bfloat16), mesh, [Shard(1)],
                                       src_data_rank=None)
        opt.step()
        bits[backend] = local(param).detach().view(torch.int16).clone()
    assert torch.equal(bits["torch"], bits["triton"])


def _shard_of(full, param):
    """The part of a full tensor that is ``param``'s local shard (Shard/Replicate placements)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                           param.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, shape))]


def fsdp2_shard1_placement(rank, world_size, shared_dir):
    """shard_placement_fn: Shard(1) (FSDP2 needs even sizes there)."""
    for backend in BACKENDS:
        torch.manual_seed(1)
        base = nn.Sequential(nn.Linear(4 * world_size, 6), nn.Tanh(), nn.Linear(6, 2 * world_size))
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (model, ref_model):
            fully_shard(m, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        assert model[0].weight.placements == (Shard(1),)
        opt, ref = train_pair(
            model, ref_model,
            lambda ps: triton_adam.Adam(ps, lr=0.02, weight_decay=0.05, backend=backend),
            lambda ps: torch.optim.Adam(ps, lr=0.02, weight_decay=0.05, fused=True),
            rank, inputs=4 * world_size)
        assert_states_match(opt, ref, list(model.parameters()), list(ref_model.parameters()),
                            backend, f"{backend}: ")


def two_meshes_and_a_plain_bias(seed, world_size):
    """Two copies of two_layer(seed): the second Linear on mesh "b", the first on mesh "a"
    except its bias, a plain tensor (ignored_params). Also returns the meshes' process groups."""
    mesh_a = init_device_mesh("cpu", (world_size,), mesh_dim_names=("a",))
    mesh_b = init_device_mesh("cpu", (world_size,), mesh_dim_names=("b",))
    base = two_layer(seed)
    model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
    for m in (model, ref_model):
        fully_shard(m[2], mesh=mesh_b)
        fully_shard(m, mesh=mesh_a, ignored_params={m[0].bias})
    return model, ref_model, {mesh_a.get_group(0), mesh_b.get_group(0)}


def mixed_tensor_and_dtensor_group(rank, world_size, shared_dir):
    """One group holding plain tensors (ignored_params) and DTensors of two meshes: torch's
    fused and foreach refuse that; the reference steps each kind in a group of its own."""
    for backend in BACKENDS:
        model, ref_model, _ = two_meshes_and_a_plain_bias(2, world_size)
        assert not isinstance(model[0].bias, DTensor)
        assert model[0].weight.device_mesh != model[2].weight.device_mesh

        opt, ref = train_pair(
            model, ref_model,
            lambda ps: triton_adam.AdamW(ps, lr=0.03, weight_decay=0.1, backend=backend),
            lambda ps: torch.optim.AdamW(groups_by_kind(ps), lr=0.03, weight_decay=0.1,
                                         fused=True), rank)
        assert len(opt.param_groups) == 1
        assert_states_match(opt, ref, list(model.parameters()), list(ref_model.parameters()),
                            backend, f"{backend}: ")


def _gather_local(t):
    pieces = [torch.empty_like(local(t)) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, local(t).contiguous())
    return pieces


def partial_grads_are_redistributed(rank, world_size, shared_dir):
    """Sequence-parallel style: a replicated param with a Partial(sum) grad. The grad is
    reduced before the step (as torch's DTensor dispatch does), so replicas stay bit-equal."""
    mesh = init_device_mesh("cpu", (world_size,))
    for backend in BACKENDS:
        torch.manual_seed(3)
        start = torch.randn(37)
        ours = nn.Parameter(DTensor.from_local(start.clone(), mesh, [Replicate()]))
        theirs = nn.Parameter(DTensor.from_local(start.clone(), mesh, [Replicate()]))
        opt = triton_adam.AdamW([ours], lr=0.1, backend=backend, max_grad_norm=1.0)
        ref = torch.optim.AdamW([theirs], lr=0.1, fused=True)
        for step in range(STEPS):
            generator = torch.Generator().manual_seed(10 * step + rank)  # differs per rank
            g = torch.randn(37, generator=generator)
            ours.grad = DTensor.from_local(g.clone(), mesh, [Partial()])
            theirs.grad = DTensor.from_local(g.clone(), mesh, [Partial()])
            opt.step()
            torch.nn.utils.clip_grad_norm_([theirs], 1.0)
            ref.step()
            replicas = _gather_local(ours)
            for other in replicas[1:]:
                assert torch.equal(replicas[0], other), "replicas drifted apart"
        # the fused clip rounds differently from clip_grad_norm_ + step
        torch.testing.assert_close(local(ours), local(theirs), rtol=1e-5, atol=1e-6)


# --- clipping and skipping across ranks ---------------------------------------------------------

def _comm_counts(fn):
    from torch.distributed.tensor.debug import CommDebugMode
    mode = CommDebugMode()
    with mode:
        fn()
    return {str(k): v for k, v in mode.get_comm_counts().items()}


def _all_reduces(counts):
    return sum(v for k, v in counts.items() if "all_reduce" in k or "allreduce" in k)


def _clip_against_torch(model, ref_model, backend, max_norm, expected_all_reduces, what,
                        data_rank=None):
    """Fused clip (ours) vs clip_grad_norm_ on the DTensors + torch fused AdamW, 3 steps.

    ``data_rank`` picks the batch (the same on the ranks of a tensor-parallel group)."""
    opt = triton_adam.AdamW(model.parameters(), lr=0.05, backend=backend,
                            max_grad_norm=max_norm)
    ref = torch.optim.AdamW(groups_by_kind(ref_model.parameters()), lr=0.05, fused=True)
    rank = dist.get_rank() if data_rank is None else data_rank
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + rank)
        x = torch.randn(4, next(model.parameters()).shape[-1], generator=generator)
        for m in (model, ref_model):
            m(x).square().mean().backward()
        same_grads(model, ref_model)
        counts = _comm_counts(opt.step)
        assert _all_reduces(counts) == expected_all_reduces, f"{what}: collectives {counts}"
        grads = [p.grad for p in ref_model.parameters()]
        norm = torch.linalg.vector_norm(torch.cat([
            (g.full_tensor() if isinstance(g, DTensor) else g).flatten() for g in grads]))
        if all(isinstance(g, DTensor) for g in grads) and len({g.device_mesh for g in grads}) == 1:
            theirs = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
            torch.testing.assert_close(theirs.full_tensor(), norm, rtol=1e-5, atol=0)
        else:  # torch's clip_grad_norm_ refuses params on several meshes (pytorch 180346)
            torch._foreach_mul_([local(g) for g in grads], (max_norm / (norm + 1e-6)).item())
        ref.step()
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-5, atol=0,
                                   msg=lambda m: f"{what} step {step}: norm {m}")
        assert norm > max_norm, "the test must clip"
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(local(p), local(q), rtol=2e-5, atol=1e-6,
                                       msg=lambda m: f"{what} step {step}: {m}")
        opt.zero_grad()
        ref.zero_grad()


def clip_matches_torch_on_1d_mesh(rank, world_size, shared_dir):
    for backend in BACKENDS:
        base = two_layer(4)
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (model, ref_model):
            fully_shard(m[0])
            fully_shard(m)
        _clip_against_torch(model, ref_model, backend, 0.05, 1, f"{backend} FSDP2")


def clip_over_meshes_and_plain_tensors(rank, world_size, shared_dir):
    """Fused clip over one group of plain tensors (ignored_params) and DTensors of two meshes:
    torch's clip_grad_norm_ refuses that; the reference norm comes from the full tensors."""
    for backend in BACKENDS:
        model, ref_model, groups = two_meshes_and_a_plain_bias(16, world_size)
        _clip_against_torch(model, ref_model, backend, 0.05, len(groups),
                            f"{backend} mixed", data_rank=0)


def clip_grad_norm_function_on_dtensors(rank, world_size, shared_dir):
    """triton_adam.clip_grad_norm_ on DTensor grads gives torch's norm and clipped grads."""
    base = two_layer(5)
    model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
    for m in (model, ref_model):
        fully_shard(m)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(rank))
    for m in (model, ref_model):
        m(x).square().mean().backward()
    full = torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])
    for norm_type in (2.0, 1.0, float("inf")):
        ours = triton_adam.clip_grad_norm_(model.parameters(), 0.01, norm_type=norm_type)
        torch.testing.assert_close(ours, torch.linalg.vector_norm(full, norm_type), rtol=1e-5,
                                   atol=0)
        if norm_type != float("inf"):  # torch's raises on an empty shard for inf
            theirs = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.01,
                                                    norm_type=norm_type)
            torch.testing.assert_close(ours, theirs.full_tensor(), rtol=1e-5, atol=0)
            for p, q in zip(model.parameters(), ref_model.parameters()):
                torch.testing.assert_close(local(p.grad), local(q.grad), rtol=1e-5, atol=1e-8)
        full = full * (0.01 / (ours + 1e-6)).clamp(max=1.0)
        clipped = torch.cat([p.grad.full_tensor().flatten() for p in model.parameters()])
        torch.testing.assert_close(clipped, full, rtol=1e-5, atol=1e-8)
    # a NaN in one rank's shard makes every rank's norm NaN, the inf-norm included
    if rank == 0:
        local(model[0].weight.grad).view(-1)[0] = float("nan")
    for norm_type in (2.0, float("inf")):
        norm = triton_adam.clip_grad_norm_(model.parameters(), 1.0, norm_type=norm_type)
        assert norm.isnan(), (norm_type, norm)


def inf_on_one_rank_skips_everywhere(rank, world_size, shared_dir):
    for backend in BACKENDS:
        model = two_layer(6)
        fully_shard(model)
        opt = triton_adam.AdamW(model.parameters(), lr=0.05, backend=backend,
                                skip_nonfinite=True)
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(rank))
        model(x).sum().backward()
        opt.step()  # a good step first: states exist
        before = [local(p).clone() for p in model.parameters()]
        states = [{k: local(v).clone() for k, v in opt.state[p].items()}
                  for p in model.parameters()]
        model(x).sum().backward()
        if rank == world_size - 1:
            local(model[0].weight.grad).view(-1)[-1] = float("inf")
        opt.step()
        assert bool(opt.last_step_skipped), "every rank must skip"
        for p, b, s in zip(model.parameters(), before, states):
            assert torch.equal(local(p), b)
            for key, value in s.items():
                assert torch.equal(local(opt.state[p][key]), value), key
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        assert not bool(opt.last_step_skipped)
        assert float(opt.state[model[0].weight]["step"]) == 2.0


def replaced_parameter_raises(rank, world_size, shared_dir):
    for backend in BACKENDS:
        model = two_layer(7)
        fully_shard(model)
        opt = triton_adam.AdamW(model.parameters(), lr=0.05, backend=backend)
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        old = [id(p) for p in model.parameters()]  # ids: a reference would keep them reachable
        model.load_state_dict(model.state_dict(), assign=True)
        model(x).sum().backward()
        assert all(id(p) not in old for p in model.parameters()), "nothing was replaced"
        try:
            opt.step()
        except RuntimeError as error:
            assert "replaced" in str(error), error
        else:
            raise AssertionError("stepping replaced params did not raise")


# --- distributed checkpoints -------------------------------------------------------------------

def _sharded_model(seed=8):
    model = two_layer(seed)
    fully_shard(model[0])
    fully_shard(model)
    return model


def _full_optimizer_state(model, opt):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def _assert_state_dicts_equal(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        if isinstance(a[key], dict):
            _assert_state_dicts_equal(a[key], b[key], f"{what}.{key}")
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{what}.{key}"
        else:
            assert a[key] == b[key], f"{what}.{key}: {a[key]} vs {b[key]}"


def dcp_warmup_leaves_params_unchanged(rank, world_size, shared_dir):
    """get_optimizer_state_dict on a fresh optimizer steps it with zero grads and lr 0 (a CPU
    tensor lr stays a tensor): params must not move, also with clipping and skipping on."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    for backend in BACKENDS:
        for lr in (0.01, torch.tensor(0.01)):
            model = _sharded_model()
            before = [local(p).clone() for p in model.parameters()]
            opt = triton_adam.AdamW(model.parameters(), lr=lr, weight_decay=0.1,
                                    backend=backend, max_grad_norm=1.0, skip_nonfinite=True)
            state = get_optimizer_state_dict(model, opt)
            for p, b in zip(model.parameters(), before):
                assert torch.equal(local(p), b), f"{backend} lr={lr!r}: the warm-up moved a param"
            assert all(p.grad is None for p in model.parameters())
            assert len(state["state"]) == 4
            assert isinstance(opt.param_groups[0]["lr"], type(lr))
            for value in state["state"].values():
                assert isinstance(value["exp_avg"], DTensor)


def dcp_save(rank, world_size, shared_dir):
    """Train 3 steps and save: DCP (sharded) and a full state dict (rank 0, torch.save)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model = _sharded_model()
    opt = triton_adam.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True,
                            backend="triton")
    for step in range(STEPS):
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(10 * step + rank))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd},
             checkpoint_id=os.path.join(shared_dir, "ckpt"))
    full = _full_optimizer_state(model, opt)
    full_model = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"optim": full, "model": full_model}, os.path.join(shared_dir, "full.pt"))
    else:
        assert full == {}, "cpu_offload + full_state_dict gives ranks other than 0 nothing"


def _dcp_load(model, opt, checkpoint_id):
    """Load a DCP checkpoint into ``model`` and ``opt`` through their own state dicts (the
    templates DCP reshards into)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def dcp_load_and_reshard(rank, world_size, shared_dir):
    """Load the 2-rank checkpoint on this world size, through DCP and through a full state
    dict broadcast from rank 0; the full state equals the saved one, and one more step equals
    torch's AdamW loaded from the same checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    saved = torch.load(os.path.join(shared_dir, "full.pt"), weights_only=False)
    for backend in BACKENDS:
        models, opts = [], []
        for make in (lambda ps: triton_adam.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True,
                                                  backend=backend),
                     lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, amsgrad=True,
                                                  fused=True)):
            model = _sharded_model(seed=99)  # other weights: the load must overwrite them
            opt = make(model.parameters())
            _dcp_load(model, opt, os.path.join(shared_dir, "ckpt"))
            models.append(model)
            opts.append(opt)
        full = _full_optimizer_state(models[0], opts[0])
        if rank == 0:
            _assert_state_dicts_equal(full, saved["optim"], f"{backend} DCP load")
        for p in opts[0].state.values():
            assert isinstance(p["exp_avg"], DTensor) and not isinstance(p["step"], DTensor)
        # and again from the full state dict, broadcast from rank 0
        model = _sharded_model(seed=98)
        opt = triton_adam.AdamW(model.parameters(), lr=0.05, weight_decay=0.1, amsgrad=True,
                                backend=backend)
        set_optimizer_state_dict(model, opt, saved["optim"] if rank == 0 else {},
                                 options=StateDictOptions(full_state_dict=True,
                                                          broadcast_from_rank0=True))
        full = _full_optimizer_state(model, opt)
        if rank == 0:
            _assert_state_dicts_equal(full, saved["optim"], f"{backend} broadcast_from_rank0")
        # one more step after the load, ours vs torch's. Not bit for bit: on 3 ranks torch's
        # own DTensor step of the loaded uneven shards differs by an ulp from its fused kernel
        # called on the same local tensors (which the torch backend matches exactly).
        x = torch.randn(3, 5, generator=torch.Generator().manual_seed(rank))
        for m, o in zip(models, opts):
            m(x).square().mean().backward()
            o.step()
        assert_states_match(opts[0], opts[1], list(models[0].parameters()),
                            list(models[1].parameters()), "triton", f"{backend} after load: ")


# --- 8-bit states (state_dtype="int8") ---------------------------------------------------------

class _AroundTheQuantizedMinimum(nn.Module):
    """Params around min_quantized_numel (4096) under fully_shard on 2 ranks: ``big`` (65 x 64 =
    4160) has shards of 33 and 32 rows (2112 elements, ending in a partial block, and 2048),
    both under 4096 and quantised all the same; ``row`` (1 x 4100) leaves rank 1 an empty
    shard; ``small`` (7 x 5) keeps float32 moments."""

    def __init__(self, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.big = nn.Parameter(torch.randn(65, 64, generator=generator))
        self.row = nn.Parameter(torch.randn(1, 4100, generator=generator))
        self.small = nn.Parameter(torch.randn(7, 5, generator=generator))


def _int8_model(seed):
    model = _AroundTheQuantizedMinimum(seed)
    fully_shard(model)
    return model


INT8 = dict(lr=0.05, weight_decay=0.1, state_dtype="int8")


def _plain_int8_twin(params, backend, options=INT8):
    """This rank's local shards as plain params, with an int8 optimizer quantising those whose
    whole (global) param is quantised: the reference for the shards' blocks."""
    twins = [nn.Parameter(local(p).detach().clone()) for p in params]
    big = [q for p, q in zip(params, twins) if p.numel() >= 4096]
    rest = [q for p, q in zip(params, twins) if p.numel() < 4096]
    ref = triton_adam.AdamW([{"params": big, "min_quantized_numel": 0},
                             {"params": rest, "min_quantized_numel": 4096}],
                            backend=backend, **options)
    return twins, ref


def _step_with_local_grads(opt, params, ref, twins, seed):
    """One step of both with the same fresh random local grads."""
    generator = torch.Generator().manual_seed(seed)
    for p, q in zip(params, twins):
        g = torch.randn(local(p).shape, generator=generator)
        p.grad = DTensor.from_local(g.clone(), p.device_mesh, p.placements, shape=p.shape,
                                    stride=p.stride())
        q.grad = g
    opt.step()
    ref.step()


def _assert_int8_twins(opt, params, ref, twins, what):
    """Local params, codes, scales and steps bit for bit the plain twins'; the codes DTensors
    with the param's placements, the scales plain tensors of this rank's blocks."""
    from triton_adam import _quantize

    for i, (p, q) in enumerate(zip(params, twins)):
        assert torch.equal(local(p), q), f"{what}param {i}"
        s, r = opt.state[p], ref.state[q]
        assert set(s) == set(r), f"{what}param {i}: {sorted(s)} vs {sorted(r)}"
        for key, value in r.items():
            if key in ("exp_avg", "exp_avg_sq"):
                assert isinstance(s[key], DTensor) and s[key].placements == p.placements
            elif key != "step":
                assert type(s[key]) is torch.Tensor, f"{what}param {i} {key}"
                assert s[key].shape == (_quantize.n_blocks(local(p).numel()),)
            assert torch.equal(local(s[key]), value), f"{what}param {i} {key}"


def int8_states_on_fsdp2(rank, world_size, shared_dir):
    """int8 states of FSDP2 params: each rank's local params, codes and scales are bit for bit
    those of its local shards stepped as plain tensors (the blocks are the local shard's, in
    memory order); whether a param is quantised is decided on its global numel; state_dict()
    holds the decoded moments as float32 DTensors; state_bytes() counts local shards; the
    backends agree bit for bit."""
    _quantized_states_on_fsdp2(rank, world_size, "int8")


def fp8_states_on_fsdp2(rank, world_size, shared_dir):
    """The same for float8 e4m3 codes (DTensors of float8_e4m3fn)."""
    _quantized_states_on_fsdp2(rank, world_size, "fp8")


def _quantized_states_on_fsdp2(rank, world_size, state_dtype):
    from triton_adam import _quantize

    fmt = _quantize.FORMATS[state_dtype]
    options = dict(INT8, state_dtype=state_dtype)
    held = {}
    for backend in BACKENDS:
        model = _int8_model(seed=6)
        params = list(model.parameters())
        opt = triton_adam.AdamW(params, backend=backend, **options)
        twins, ref = _plain_int8_twin(params, backend, options)
        for step in range(STEPS):
            _step_with_local_grads(opt, params, ref, twins, seed=100 * step + rank)
        _assert_int8_twins(opt, params, ref, twins, f"{backend}: ")
        big, row, small = (opt.state[p] for p in params)
        assert local(big["exp_avg"]).numel() < 4096 and big["exp_avg"].dtype == fmt.signed_dtype
        assert row["exp_avg_sq"].dtype == fmt.unsigned_dtype
        assert small["exp_avg"].dtype == torch.float32
        if world_size == 2:
            assert local(row["exp_avg"]).shape == ((1, 4100), (0, 4100))[rank]
        numel = local(params[0]).numel()
        assert opt.state_bytes(per_param=True)[params[0]] == \
            2 * numel + 8 * _quantize.n_blocks(numel)
        saved = opt.state_dict()["state"][0]
        assert isinstance(saved["exp_avg"], DTensor) and saved["exp_avg"].dtype == torch.float32
        assert saved["exp_avg"].placements == params[0].placements
        decoded = _quantize.dense(params[0], big)["exp_avg"]
        assert torch.equal(local(saved["exp_avg"]), local(decoded))
        held[backend] = [[local(p).clone()] + [local(t).clone() for t in opt.state[p].values()]
                         for p in params[:2]]
    for torch_side, triton_side in zip(held["torch"], held["triton"]):
        assert all(torch.equal(a, b) for a, b in zip(torch_side, triton_side)), "backends"


def compact_state_dict_refused_on_fsdp2(rank, world_size, shared_dir):
    """state_dict(compact=True) of FSDP2 params with int8 moments raises, naming the param:
    their block scales are this rank's own plain tensors, of which DCP would keep one rank's
    copy for all. state_dict() still works, and plain params' compact dicts hold codes."""
    model = _int8_model(seed=9)
    params = list(model.parameters())
    opt = triton_adam.AdamW(params, backend="torch", **INT8)
    twins, ref = _plain_int8_twin(params, "torch")
    _step_with_local_grads(opt, params, ref, twins, seed=rank)
    try:
        opt.state_dict(compact=True)
    except ValueError as error:
        assert "param 0 of group 0" in str(error) and "compact=True" in str(error), error
    else:
        raise AssertionError("state_dict(compact=True) of int8 DTensor states did not raise")
    assert isinstance(opt.state_dict()["state"][0]["exp_avg"], DTensor)
    assert ref.state_dict(compact=True)["state"][0]["exp_avg"].dtype == torch.int8


def int8_dcp_save(rank, world_size, shared_dir):
    """Train int8 states 3 steps on 2 ranks and save: DCP (the moments dense float32
    DTensors) and the full optimizer state (rank 0, torch.save)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model = _int8_model(seed=7)
    params = list(model.parameters())
    opt = triton_adam.AdamW(params, backend="triton", **INT8)
    twins, ref = _plain_int8_twin(params, "triton")
    for step in range(STEPS):
        _step_with_local_grads(opt, params, ref, twins, seed=10 * step + rank)
    model_sd, optim_sd = get_state_dict(model, opt)
    for state in optim_sd["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert isinstance(state[key], DTensor) and state[key].dtype == torch.float32
    dcp.save({"model": model_sd, "optim": optim_sd},
             checkpoint_id=os.path.join(shared_dir, "ckpt-int8"))
    full = _full_optimizer_state(model, opt)
    if rank == 0:
        torch.save(full, os.path.join(shared_dir, "full-int8.pt"))


def int8_dcp_load_and_reshard(rank, world_size, shared_dir):
    """Load the 2-rank int8 checkpoint on this world size (other shards, so other blocks):
    the loaded dense moments equal the saved ones, torch's AdamW loads the same checkpoint,
    and the next steps quantise them into this rank's blocks, bit for bit as this rank's
    shards stepped as plain tensors from the same dense moments."""
    saved = torch.load(os.path.join(shared_dir, "full-int8.pt"), weights_only=False)

    def load(make):
        model = _int8_model(seed=97)  # other weights: the load must overwrite them
        opt = make(model.parameters())
        _dcp_load(model, opt, os.path.join(shared_dir, "ckpt-int8"))
        return model, opt

    torch_model, torch_opt = load(lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1))
    theirs = list(torch_model.parameters())
    for backend in BACKENDS:
        model, opt = load(lambda ps: triton_adam.AdamW(ps, backend=backend, **INT8))
        params = list(model.parameters())
        full = _full_optimizer_state(model, opt)  # a collective: every rank joins
        if rank == 0:
            _assert_state_dicts_equal(full, saved, f"{backend} DCP load")
        twins, ref = _plain_int8_twin(params, backend)
        for p, q, t in zip(params, twins, theirs):
            state = opt.state[p]
            assert state["exp_avg"].dtype == torch.float32  # quantised at the next step
            assert torch.equal(local(state["exp_avg"]), local(torch_opt.state[t]["exp_avg"]))
            ref.state[q] = {key: local(value).clone() for key, value in state.items()}
        for step in range(2):
            _step_with_local_grads(opt, params, ref, twins, seed=10 * step + rank)
        assert opt.state[params[0]]["exp_avg"].dtype == torch.int8
        _assert_int8_twins(opt, params, ref, twins, f"{backend} after load: ")


# --- DDP and ZeRO ------------------------------------------------------------------------------

def ddp_bucket_views_and_set_to_none(rank, world_size, shared_dir):
    """DDP grads are views into its buckets (element-aligned, moved once after iteration 0)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    for backend in BACKENDS:
        for bucket_view in (False, True):
            for set_to_none in (False, True):
                base = two_layer(9)
                model = DDP(copy.deepcopy(base), gradient_as_bucket_view=bucket_view)
                ref_model = DDP(copy.deepcopy(base), gradient_as_bucket_view=bucket_view)
                opt = triton_adam.AdamW(model.parameters(), lr=0.05, weight_decay=0.1,
                                        backend=backend)
                ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1,
                                        fused=True)
                for step in range(STEPS + 1):
                    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(step + rank))
                    for m, o in ((model, opt), (ref_model, ref)):
                        m(x).square().mean().backward()
                        o.step()
                        o.zero_grad(set_to_none=set_to_none)
                what = f"{backend} bucket_view={bucket_view} set_to_none={set_to_none}: "
                assert_states_match(opt, ref, list(model.parameters()),
                                    list(ref_model.parameters()), backend, what)


def zero_redundancy_with_an_empty_rank(rank, world_size, shared_dir):
    """ZeroRedundancyOptimizer over triton_adam.AdamW: one param, so a rank holds none; an lr
    scheduler drives it through ZeRO's param groups; consolidate_state_dict gathers it."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    for backend in BACKENDS:
        for bucket_view in (False, True):
            torch.manual_seed(10)
            base = nn.Linear(6, 1, bias=False)
            model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
            opt = ZeroRedundancyOptimizer(model.parameters(), triton_adam.AdamW, lr=0.05,
                                          weight_decay=0.1, backend=backend,
                                          parameters_as_bucket_view=bucket_view)
            ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, weight_decay=0.1,
                                    fused=True)
            schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5)
                          for o in (opt, ref)]
            for step in range(STEPS):
                x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
                for m, o, s in zip((model, ref_model), (opt, ref), schedulers):
                    m(x).square().mean().backward()
                    if m is model:  # the reference is not wrapped in DDP: average by hand
                        for p in m.parameters():
                            dist.all_reduce(p.grad)
                            p.grad /= world_size
                    else:
                        for p in m.parameters():
                            p.grad.mul_(world_size).div_(world_size)
                    o.step()
                    s.step()
                    o.zero_grad()
            for p, q in zip(model.parameters(), ref_model.parameters()):
                assert_same(p, q, backend, f"{backend} bucket_view={bucket_view}")
            opt.consolidate_state_dict(to=0)
            if rank == 0:
                state = opt.state_dict()
                assert state["state"][0]["exp_avg"].shape == (1, 6)
                assert_same(state["state"][0]["exp_avg"], ref.state[ref_model.weight]["exp_avg"],
                            backend, "consolidated exp_avg")


# --- 2-D meshes (4 ranks) ----------------------------------------------------------------------

def hsdp_matches_torch_and_clips(rank, world_size, shared_dir):
    """HSDP: (Replicate, Shard(0)) on a 2x2 mesh."""
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("replicate", "shard"))
    for backend in BACKENDS:
        base = two_layer(11)
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (model, ref_model):
            fully_shard(m, mesh=mesh)
        assert model[0].weight.placements == (Replicate(), Shard(0))
        opt, ref = train_pair(
            model, ref_model,
            lambda ps: triton_adam.AdamW(ps, lr=0.05, weight_decay=0.1, backend=backend),
            lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, fused=True), rank)
        assert_states_match(opt, ref, list(model.parameters()), list(ref_model.parameters()),
                            backend, f"{backend} HSDP: ")
        base = two_layer(12)
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (model, ref_model):
            fully_shard(m, mesh=mesh)
        _clip_against_torch(model, ref_model, backend, 0.05, 2, f"{backend} HSDP")


def _tp_mlp(mesh, seed):
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8), nn.LayerNorm(8))
    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def fsdp_tp_matches_torch_and_clips(rank, world_size, shared_dir):
    """FSDP x TP on a 2x2 (dp, tp) mesh: 2-D placements, including _StridedShard."""
    mesh = init_device_mesh("cpu", (2, world_size // 2), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()  # tensor-parallel ranks share a batch
    for backend in BACKENDS:
        model, ref_model = _tp_mlp(mesh, 13), _tp_mlp(mesh, 13)
        placements = {str(p.placements) for p in model.parameters()}
        assert any("_StridedShard" in p or "Shard(dim=0), Shard" in p for p in placements), \
            placements
        opt, ref = train_pair(
            model, ref_model,
            lambda ps: triton_adam.AdamW(ps, lr=0.05, weight_decay=0.1, backend=backend),
            lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, fused=True), dp_rank,
            inputs=8)
        assert_states_match(opt, ref, list(model.parameters()), list(ref_model.parameters()),
                            backend, f"{backend} FSDPxTP: ")
        model, ref_model = _tp_mlp(mesh, 14), _tp_mlp(mesh, 14)
        _clip_against_torch(model, ref_model, backend, 0.05, 2, f"{backend} FSDPxTP",
                            data_rank=dp_rank)


# --- the README's example ----------------------------------------------------------------------

def readme_fsdp2_example(rank, world_size, shared_dir):
    """The README's FSDP2 block, run as written (process group already up; its checkpoint in
    the test's directory): it must train, clip, save and load."""
    import re
    import unittest.mock

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "README.md")
    with open(readme) as f:
        text = f.read()
    block = re.search(r"<!-- fsdp2-example.*?-->\n```python\n(.*?)```", text, re.S).group(1)
    assert block.count("\n") <= 30, "keep the README example short"
    block = block.replace('"ckpt"', repr(os.path.join(shared_dir, "readme-ckpt")))
    namespace = {}
    with unittest.mock.patch.object(dist, "init_process_group"), \
            unittest.mock.patch.object(dist, "destroy_process_group"):
        exec(compile(block, "README.md", "exec"), namespace)
    opt = namespace["opt"]
    assert isinstance(opt, triton_adam.AdamW) and opt.last_grad_norm is not None
    assert all(float(s["step"]) == 5 for s in opt.state.values())
    assert all(isinstance(s["exp_avg"], DTensor) for s in opt.state.values())


def swapped_shards_are_followed(rank, world_size, shared_dir):
    """load_state_dict(assign=True) with swap_tensors on: the same Parameter objects get new
    local shards (FSDP2's reset_sharded_param); the next step updates the new memory."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for backend in BACKENDS:
            base = two_layer(15)
            model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
            for m in (model, ref_model):
                fully_shard(m)
            opt = triton_adam.AdamW(model.parameters(), lr=0.05, backend=backend)
            ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, fused=True)
            x = torch.randn(3, 5, generator=torch.Generator().manual_seed(rank))
            for m, o in ((model, opt), (ref_model, ref)):
                m(x).square().mean().backward()
                o.step()
                o.zero_grad()
            params = list(model.parameters())
            shards = [local(p).data_ptr() for p in params if local(p).numel()]
            from torch.distributed.tensor import distribute_tensor
            full = {k: v.full_tensor() * 0.5 for k, v in ref_model.state_dict().items()}
            for m in (model, ref_model):  # swap_tensors swaps contents: one dict each
                m.load_state_dict({k: nn.Parameter(distribute_tensor(v.clone(), p.device_mesh,
                                                                     p.placements))
                                   for (k, v), p in zip(full.items(), m.parameters())},
                                  assign=True)
            assert all(p is q for p, q in zip(model.parameters(), params)), "objects kept"
            moved = [local(p).data_ptr() for p in params if local(p).numel()]
            assert moved != shards, "the test needs new local memory"
            for m, o in ((model, opt), (ref_model, ref)):
                m(x).square().mean().backward()
                o.step()
            assert_states_match(opt, ref, params, list(ref_model.parameters()), backend,
                                f"{backend} after swap: ")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def ranks_with_only_empty_shards_or_no_grads_join(rank, world_size, shared_dir):
    """Linear(3, 1) on 2 ranks: rank 1 holds only empty shards; then a step where rank 1 has
    no grads at all. Every rank joins the clip's all-reduces (or the others would hang), the
    norm is the whole model's, and every rank agrees on it and on the skip."""
    for backend in BACKENDS:
        torch.manual_seed(17)
        base = nn.Linear(3, 1)
        model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
        for m in (model, ref_model):
            fully_shard(m)
        if world_size == 2:
            assert (local(model.weight).numel() == 0) == (rank == 1)
        opt = triton_adam.AdamW(model.parameters(), lr=0.05, backend=backend,
                                max_grad_norm=0.01, skip_nonfinite=True)
        ref = torch.optim.AdamW(ref_model.parameters(), lr=0.05, fused=True)
        x = torch.randn(4, 3, generator=torch.Generator().manual_seed(rank))
        for m in (model, ref_model):
            m(x).square().mean().backward()
        opt.step()
        full = torch.cat([p.grad.full_tensor().flatten() for p in ref_model.parameters()])
        norm = torch.linalg.vector_norm(full)
        torch.testing.assert_close(opt.last_grad_norm, norm, rtol=1e-5, atol=0)
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.01)
        ref.step()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(local(p), local(q), rtol=2e-5, atol=1e-6)
        # no grads on the last rank this time: it still joins, and sees rank 0's norm
        opt.zero_grad()
        for p in model.parameters():
            if rank != world_size - 1:
                g = torch.full_like(local(p), 2.0)
                p.grad = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape,
                                            stride=p.stride())
        opt.step()
        expected = torch.tensor(2.0 * (sum(local(p).numel() for p in model.parameters())
                                       if rank != world_size - 1 else 0.0))
        dist.all_reduce(expected)  # sum of 4*numel over ranks with grads, then the root
        torch.testing.assert_close(opt.last_grad_norm, (2.0 * expected).sqrt(), rtol=1e-6,
                                   atol=0)
        assert not bool(opt.last_step_skipped)
