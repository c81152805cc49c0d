"""float32 grads for bfloat16/float16 params (an fp32 grad accumulation buffer)."""
import pytest
import torch

import triton_adam
from conftest import DEVICE_BACKENDS, backends_on
from reference import ReferenceAdam

SHAPES = [(), (9,), (4096 + 3,), (21, 13), (0,)]
LR = 1e-2
STEPS = 6


def make(dtype):
    generator = torch.Generator().manual_seed(11)
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in SHAPES]


def grads(step, dtype=torch.float32):
    generator = torch.Generator().manual_seed(200 + step)
    return [torch.randn(s, generator=generator, dtype=torch.float64).mul(1e-3).to(dtype)
            for s in SHAPES]


def params_of(dtype, device):
    params = [torch.nn.Parameter(v.to(device)) for v in make(dtype)]
    for p in params:
        p.grad_dtype = None  # torch >= 2.10 checks .grad's dtype against this; None: any
    return params


def run(backend, param_dtype, grad_dtypes, device="cpu", **kwargs):
    params = params_of(param_dtype, device)
    opt = triton_adam.AdamW(params, lr=LR, weight_decay=0.1, backend=backend, **kwargs)
    for step, grad_dtype in enumerate(grad_dtypes):
        for p, g in zip(params, grads(step, grad_dtype)):
            p.grad = g.to(device)
        opt.step()
    return params, opt


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_both_backends_give_the_same_bits(param_dtype, amsgrad):
    if "triton" not in backends_on("cpu"):
        pytest.skip("the Triton kernels need the interpreter on CPU")
    schedule = [torch.float32] * STEPS
    ours, opt = run("triton", param_dtype, schedule, amsgrad=amsgrad)
    theirs, ref = run("torch", param_dtype, schedule, amsgrad=amsgrad)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ()):
            assert torch.equal(opt.state[p][key], ref.state[q][key]), key
    # the fused clip: the norm of the float32 grads (the two backends reduce in other orders)
    _, opt = run("triton", param_dtype, schedule, amsgrad=amsgrad, max_grad_norm=0.05)
    _, ref = run("torch", param_dtype, schedule, amsgrad=amsgrad, max_grad_norm=0.05)
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads(STEPS - 1)]))
    torch.testing.assert_close(opt.last_grad_norm, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(ref.last_grad_norm, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_float32_grads_are_read_unrounded(device, backend):
    """The update follows a float64 reference fed the float32 grads; the same grads rounded to
    bfloat16 first give other params (they are read at full precision, not rounded)."""
    params, _ = run(backend, torch.bfloat16, [torch.float32] * STEPS, device,
                    state_dtype=torch.float32)
    reference = ReferenceAdam(make(torch.bfloat16), torch.bfloat16, LR, (0.9, 0.999), 1e-8, 0.1,
                              False, False, True, state_dtype=torch.float32)
    for step in range(STEPS):
        reference.step(grads(step))
    for p, expected in zip(params, reference.params):
        ulp = torch.finfo(torch.bfloat16).eps * expected.abs().clamp_min(1e-2)
        assert ((p.detach().cpu().double() - expected).abs() <= ulp).all()
    rounded, _ = run(backend, torch.bfloat16, [torch.bfloat16] * STEPS, device,
                     state_dtype=torch.float32)
    assert any(not torch.equal(p, q) for p, q in zip(params, rounded))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_dtype_may_change_between_steps(device, backend):
    schedule = [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.float32]
    params, opt = run(backend, torch.bfloat16, schedule, device)
    again = params_of(torch.bfloat16, device)
    one_by_one = []
    for step, grad_dtype in enumerate(schedule):
        # a fresh optimizer for every step would lose the state: load it each time instead
        opt2 = triton_adam.AdamW(again, lr=LR, weight_decay=0.1, backend=backend)
        if one_by_one:
            opt2.load_state_dict(one_by_one[-1])
        for p, g in zip(again, grads(step, grad_dtype)):
            p.grad = g.to(device)
        opt2.step()
        one_by_one.append(opt2.state_dict())
    for p, q in zip(params, again):
        assert torch.equal(p, q)


@pytest.mark.parametrize("param_dtype,grad_dtype", [(torch.float32, torch.bfloat16),
                                                    (torch.bfloat16, torch.float16),
                                                    (torch.bfloat16, torch.float64)])
def test_other_grad_dtypes_are_refused_before_anything_changes(param_dtype, grad_dtype):
    p = torch.nn.Parameter(torch.ones(4, dtype=param_dtype))
    p.grad_dtype = None
    opt = triton_adam.AdamW([p], lr=0.1)
    p.grad = torch.ones(4, dtype=grad_dtype)
    with pytest.raises(TypeError, match="grad has dtype"):
        opt.step()
    assert torch.equal(p, torch.ones(4, dtype=param_dtype)) and not opt.state
