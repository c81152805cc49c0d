"""state_dtype: moments held in another dtype than the params, math in float32."""
import itertools

import pytest
import torch

import triton_adam
from conftest import DEVICE_BACKENDS, backends_on
from interpreter_faults import skip_if_fma_rounds_twice
from reference import ReferenceAdam

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIXED = [(p, s) for p, s in itertools.product(DTYPES, DTYPES[:2]) if p != s]
IDS = [f"{str(p)[6:]}-{str(s)[6:]}" for p, s in MIXED]
SHAPES = [(), (7,), (4096 + 5,), (33, 17), (0,)]
STEPS = 8
LR = 1e-2


def make(dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in SHAPES]


def grads_for(step, dtype):
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in SHAPES]


def run(backend, param_dtype, state_dtype, amsgrad, device="cpu", **kwargs):
    params = [torch.nn.Parameter(v.to(device)) for v in make(param_dtype, 3)]
    opt = triton_adam.AdamW(params, lr=LR, weight_decay=0.1, amsgrad=amsgrad, backend=backend,
                            state_dtype=state_dtype, **kwargs)
    for step in range(STEPS):
        for p, g in zip(params, grads_for(step, param_dtype)):
            p.grad = g.to(device)
        opt.step()
    return params, opt


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("param_dtype,state_dtype", MIXED, ids=IDS)
def test_both_backends_give_the_same_bits(param_dtype, state_dtype, amsgrad):
    """The torch fallback runs the Triton kernel's float32 arithmetic for mixed dtypes."""
    if "triton" not in backends_on("cpu"):
        pytest.skip("the Triton kernels need the interpreter on CPU")
    skip_if_fma_rounds_twice(torch.float32)
    ours, opt = run("triton", param_dtype, state_dtype, amsgrad)
    theirs, ref = run("torch", param_dtype, state_dtype, amsgrad)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            a, b = opt.state[p][key], ref.state[q][key]
            assert a.dtype == b.dtype == state_dtype
            assert torch.equal(a, b), key


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("param_dtype,state_dtype", MIXED, ids=IDS)
def test_follows_a_float64_reference_that_rounds_the_same_values(device, backend, param_dtype,
                                                                 state_dtype):
    """Within what one rounding of a stored moment can move a param: a moment whose float32
    value lands on the other side of a rounding boundary than the float64 one shifts the update
    by up to half an ulp of the state dtype (relative), i.e. about lr * eps_state per step."""
    params, opt = run(backend, param_dtype, state_dtype, False, device)
    reference = ReferenceAdam(make(param_dtype, 3), param_dtype, LR, (0.9, 0.999), 1e-8, 0.1,
                              False, False, True, state_dtype=state_dtype)
    for step in range(STEPS):
        reference.step(grads_for(step, param_dtype))
    param_ulp = torch.finfo(param_dtype).eps
    state_ulp = torch.finfo(state_dtype).eps
    for p, expected in zip(params, reference.params):
        if p.numel() == 0:
            continue
        bound = STEPS * LR * state_ulp + 2 * param_ulp * expected.abs().clamp_min(1e-2)
        assert ((p.detach().cpu().double() - expected).abs() <= bound).all()
    for p in params:
        assert opt.state[p]["exp_avg"].dtype == state_dtype
        assert opt.state[p]["exp_avg"].element_size() == torch.finfo(state_dtype).bits // 8


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_state_dict_both_ways_with_torch(device, backend):
    """bfloat16 moments of float32 params: into torch.optim.AdamW (which casts them to the
    params' dtype, exactly) and back from a torch checkpoint (rounded once to bfloat16)."""
    params, opt = run(backend, torch.float32, torch.bfloat16, False, device)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(theirs, lr=LR, weight_decay=0.1)
    torch_opt.load_state_dict(opt.state_dict())
    for p, q in zip(params, theirs):
        assert torch_opt.state[q]["exp_avg"].dtype == torch.float32
        assert torch.equal(torch_opt.state[q]["exp_avg"], opt.state[p]["exp_avg"].float())
    for q, g in zip(theirs, grads_for(99, torch.float32)):
        q.grad = g.to(device)
    torch_opt.step()
    again = [torch.nn.Parameter(q.detach().clone()) for q in theirs]
    ours = triton_adam.AdamW(again, lr=LR, weight_decay=0.1, backend=backend,
                             state_dtype=torch.bfloat16)
    ours.load_state_dict(torch_opt.state_dict())
    expected = {id(p): torch_opt.state[q]["exp_avg_sq"].to(torch.bfloat16)
                for p, q in zip(again, theirs)}
    for p, g in zip(again, grads_for(100, torch.float32)):
        p.grad = g.to(device)
    ours.step()
    for p in again:
        assert ours.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    # the loaded moments were rounded once: one more step from them by hand, in float64
    for p, g in zip(again, grads_for(100, torch.float32)):
        v = expected[id(p)].double() * 0.999 + 0.001 * g.double().to(device) ** 2
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"].double(),
                                   v.to(torch.bfloat16).double(), rtol=2**-7, atol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_skipped_step_keeps_low_precision_moments(device, backend):
    params, opt = run(backend, torch.float32, torch.bfloat16, False, device,
                      skip_nonfinite=True)
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params}
    values = [p.detach().clone() for p in params]
    for p, g in zip(params, grads_for(7, torch.float32)):
        p.grad = g.to(device)
    params[2].grad.view(-1)[3] = float("nan")
    opt.step()
    assert bool(opt.last_step_skipped)
    for p, v in zip(params, values):
        assert torch.equal(p, v)
        for key, value in before[id(p)].items():
            assert torch.equal(opt.state[p][key], value), key


@pytest.mark.parametrize("bad", ["int2", torch.int8, torch.float64, torch.float16, "bfloat16"])
def test_unknown_state_dtype_is_refused(bad):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="state_dtype"):
        triton_adam.AdamW([p], state_dtype=bad)
    opt = triton_adam.AdamW([p])
    with pytest.raises(ValueError, match="state_dtype"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "state_dtype": bad})


def test_state_dtype_on_float64_params_is_refused_before_anything_changes():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = triton_adam.AdamW([p], state_dtype=torch.bfloat16, backend="torch")
    p.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="state_dtype"):
        opt.step()
    assert torch.equal(p, torch.ones(3, dtype=torch.float64)) and not opt.state


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dtensor_states_are_sharded_in_the_state_dtype(backend):
    """FSDP2 params (one rank of 2 on the fake process group): the moments are DTensors with the
    param's placements, in the state dtype, and both backends step them alike."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if backend not in backends_on("cpu"):
        pytest.skip("the Triton kernels need the interpreter on CPU")
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=2)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 7)
        fully_shard(model)
        opt = triton_adam.AdamW(model.parameters(), lr=LR, backend=backend,
                                state_dtype=torch.bfloat16)
        for p in model.parameters():
            p.grad = DTensor.from_local(torch.ones_like(p._local_tensor), p.device_mesh,
                                        p.placements, shape=p.shape, stride=p.stride())
        opt.step()
        for p in model.parameters():
            exp_avg = opt.state[p]["exp_avg"]
            assert isinstance(exp_avg, DTensor) and exp_avg.placements == p.placements
            assert exp_avg.dtype == torch.bfloat16
            assert exp_avg._local_tensor.shape == p._local_tensor.shape
            # first AdamW step on ones: m = 0.1, rounded to bfloat16
            assert torch.equal(exp_avg._local_tensor,
                               torch.full_like(exp_avg._local_tensor, 0.1))
    finally:
        dist.destroy_process_group()
