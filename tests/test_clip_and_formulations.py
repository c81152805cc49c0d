"""Fused clipping, non-finite skipping and the Adam/AdamW papers' formulations (issue 4)."""
import copy
import math

import numpy as np
import pytest
import torch

import triton_adam
from conftest import DEVICE_BACKENDS, backends_on
from interpreter_faults import skip_if_fma_rounds_twice

NORM_TYPES = [2.0, 1.0, float("inf")]


def random_grads(device, dtypes=(torch.float32,), n=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i in range(n):
        shape = (int(torch.randint(1, 3000, (1,), generator=generator)),)
        dtype = dtypes[i % len(dtypes)]
        p = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device, dtype))
        p.grad = (torch.randn(shape, generator=generator) * 3).to(device, dtype)
        params.append(p)
    return params


def clone_params(params):
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("device", [d for d, b in [(p.values[0], p.values[1])
                                                   for p in DEVICE_BACKENDS] if b == "triton"])
@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l2", "l1", "inf"])
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float32, torch.bfloat16)],
                         ids=["fp32", "fp32+bf16"])
def test_clip_grad_norm_matches_torch(device, norm_type, dtypes):
    ours = random_grads(device, dtypes)
    theirs = clone_params(ours)
    ours_norm = triton_adam.clip_grad_norm_(ours, max_norm=1.0, norm_type=norm_type)
    torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0, norm_type=norm_type,
                                                foreach=False)
    assert ours_norm.dtype == torch_norm.dtype
    rtol = 1e-5 if dtypes == (torch.float32,) else 1e-2
    torch.testing.assert_close(ours_norm, torch_norm, rtol=rtol, atol=0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=1e-6)
    # deterministic: the same grads give the same bits
    again = clone_params(theirs)
    for p, q in zip(again, ours):
        p.grad = q.grad.clone()
    first = triton_adam.clip_grad_norm_(again, max_norm=1e9, norm_type=norm_type)
    for p, q in zip(again, ours):
        p.grad = q.grad.clone()
    second = triton_adam.clip_grad_norm_(again, max_norm=1e9, norm_type=norm_type)
    assert torch.equal(first, second)


@pytest.mark.parametrize("norm_type", NORM_TYPES, ids=["l2", "l1", "inf"])
def test_clip_grad_norm_nonfinite(norm_type):
    for bad in (float("nan"), float("inf")):
        ours = random_grads("cpu", n=5)
        ours[3].grad[7] = bad
        theirs = clone_params(ours)
        ours_norm = triton_adam.clip_grad_norm_(ours, 1.0, norm_type)
        torch_norm = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
        torch.testing.assert_close(ours_norm, torch_norm, equal_nan=True)
        with pytest.raises(RuntimeError, match="non-finite"):
            triton_adam.clip_grad_norm_(ours, 1.0, norm_type, error_if_nonfinite=True)


def train_steps(params, optimizer, steps, seed, clip=None, poison=None):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=generator) * 5).to(p.device, p.dtype)
        if poison is not None and step == poison:
            params[1].grad[0] = float("nan")
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=False)
        optimizer.step()


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_fused_clip_matches_clip_then_torch_adamw(device, backend):
    ours = random_grads(device, n=12, seed=1)
    theirs = clone_params(ours)
    ours_opt = triton_adam.AdamW(ours, lr=1e-2, max_grad_norm=1.0, backend=backend)
    torch_opt = torch.optim.AdamW(theirs, lr=1e-2, foreach=False)
    grads_before = [p.grad.clone() for p in ours]
    train_steps(ours, ours_opt, 1, seed=5)
    train_steps(theirs, torch_opt, 1, seed=5, clip=1.0)
    train_steps(ours, ours_opt, 5, seed=6)
    train_steps(theirs, torch_opt, 5, seed=6, clip=1.0)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours_opt.last_grad_norm.dim() == 0 and ours_opt.last_grad_norm > 1.0
    assert not ours_opt.last_step_skipped
    # the Triton step never rewrites the grads; the torch fallback (torch's fused kernel with
    # the clip folded into its grad_scale) leaves them clipped, as clip_grad_norm_ would
    fresh = random_grads(device, n=12, seed=1)
    opt = triton_adam.AdamW(fresh, lr=1e-2, max_grad_norm=1e-3, backend=backend)
    opt.step()
    clipped = clone_params(fresh)
    for p, g in zip(clipped, grads_before):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(clipped, 1e-3)
    for p, g, c in zip(fresh, grads_before, clipped):
        if backend == "triton":
            assert torch.equal(p.grad, g)
        else:
            torch.testing.assert_close(p.grad, c.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_fused_clip_with_grad_scaler_matches_unscale_clip_step(device, backend):
    torch.manual_seed(0)
    models = [torch.nn.Linear(9, 4).to(device) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours_opt = triton_adam.AdamW(models[0].parameters(), lr=1e-2, max_grad_norm=0.5,
                                 backend=backend)
    torch_opt = torch.optim.AdamW(models[1].parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    for step in range(4):
        x = torch.randn(8, 9, generator=torch.Generator().manual_seed(step)).to(device)
        for i, (model, opt) in enumerate(zip(models, (ours_opt, torch_opt))):
            opt.zero_grad()
            scalers[i].scale(model(x).pow(2).sum()).backward()
            if i == 1:
                scalers[i].unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scalers[i].step(opt)
            scalers[i].update()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_skip_nonfinite_skips_everything_bit_for_bit(device, backend):
    params = random_grads(device, n=6, seed=2)
    opt = triton_adam.AdamW(params, lr=1e-2, skip_nonfinite=True, amsgrad=True,
                            backend=backend)
    train_steps(params, opt, 2, seed=3)
    assert not opt.last_step_skipped
    values = [p.detach().clone() for p in params]
    state = copy.deepcopy(opt.state_dict()["state"])
    train_steps(params, opt, 1, seed=4, poison=0)
    assert opt.last_step_skipped.item() is True
    assert torch.isnan(opt.last_grad_norm)
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    for index, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, state[index][key]), key
    train_steps(params, opt, 1, seed=5)
    assert not opt.last_step_skipped
    assert all(opt.state[p]["step"].item() == 3 for p in params)


# --- the papers' formulations -------------------------------------------------------------

def numpy_adam_paper(theta, grads, lr, beta1, beta2, eps, bias_correction=True):
    """Kingma & Ba, Algorithm 1 in its efficient form (section 2), transcribed in NumPy."""
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        if bias_correction:
            lr_t = lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        else:
            lr_t = lr
        theta = theta - lr_t * m / (np.sqrt(v) + eps)
    return theta


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("bias_correction", [True, False])
def test_eps_mode_paper_matches_the_papers_algorithm(device, backend, bias_correction):
    rng = np.random.default_rng(0)
    theta0 = rng.standard_normal(1500)
    grads = [rng.standard_normal(1500) * 1e-3 for _ in range(30)]  # small grads: eps matters
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-3)
    expected = numpy_adam_paper(theta0, grads, bias_correction=bias_correction, **hyper)
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float32, device=device))
    opt = triton_adam.Adam([p], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]),
                           eps=hyper["eps"], eps_mode="paper", bias_correction=bias_correction,
                           backend=backend)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float32, device=device)
        opt.step()
    np.testing.assert_allclose(p.detach().cpu().double().numpy(), expected, rtol=0, atol=2e-6)
    # and it is a different algorithm from torch's placement of eps
    torch_style = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float32, device=device))
    opt = torch.optim.Adam([torch_style], lr=hyper["lr"], betas=(0.9, 0.999), eps=1e-3)
    for g in grads:
        torch_style.grad = torch.tensor(g, dtype=torch.float32, device=device)
        opt.step()
    if bias_correction:
        assert (torch_style.detach().cpu().double().numpy() - expected).__abs__().max() > 1e-4


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_schedule_weight_decay_under_cosine_restarts(device, backend):
    """weight_decay_mode="schedule": p -= eta_t * wd * p with eta_t = lr_t / initial_lr."""
    rng = np.random.default_rng(1)
    theta0 = rng.standard_normal(700)
    grads = [rng.standard_normal(700) for _ in range(25)]
    base_lr, wd, beta1, beta2, eps = 3e-2, 0.1, 0.9, 0.99, 1e-8
    p = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float32, device=device))
    opt = triton_adam.AdamW([p], lr=base_lr, betas=(beta1, beta2), eps=eps, weight_decay=wd,
                            weight_decay_mode="schedule", backend=backend)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=7, eta_min=1e-4)
    lrs = []
    for g in grads:
        lrs.append(opt.param_groups[0]["lr"])
        p.grad = torch.tensor(g, dtype=torch.float32, device=device)
        opt.step()
        scheduler.step()
    # hand-written reference (float64), the AdamW paper's Algorithm 2 with torch's eps placement
    theta, m, v = theta0.copy(), np.zeros(700), np.zeros(700)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        eta = lr / base_lr
        theta = theta - eta * wd * theta
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        theta = theta - lr / (1 - beta1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - beta2 ** t) + eps)
    np.testing.assert_allclose(p.detach().cpu().double().numpy(), theta, rtol=0, atol=3e-6)
    assert len(set(lrs)) > 5 and min(lrs) < base_lr / 10  # the schedule really moved


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("make_scheduler", [
    lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    # OneCycleLR sets each group's lr itself: the multipliers go into its per-group max_lr
    lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=[3 * g["lr"] for g in o.param_groups], total_steps=8),
], ids=["lambda", "cosine-restarts", "one-cycle"])
def test_lr_schedulers_drive_ours_as_torch_adamw(device, backend, make_scheduler):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8),
                                torch.nn.Linear(8, 2)).to(device)
    twin = copy.deepcopy(model)
    groups = triton_adam.param_groups(model, weight_decay=0.1, lr=1e-2,
                                      lr_multipliers={r"^2\.": 2.0})
    twin_groups = triton_adam.param_groups(twin, weight_decay=0.1, lr=1e-2,
                                           lr_multipliers={r"^2\.": 2.0})
    ours = triton_adam.AdamW(groups, lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(twin_groups, lr=1e-2, foreach=False)
    schedulers = [make_scheduler(ours), make_scheduler(theirs)]
    for step in range(8):
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(step)).to(device)
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        for s in schedulers:
            s.step()
        assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_param_groups_helper():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 2))
    groups = triton_adam.param_groups(model, weight_decay=0.05)
    decay = [g for g in groups if g["weight_decay"] == 0.05]
    assert [n for g in decay for n in g["param_names"]] == ["0.weight", "2.weight"]
    no_decay = [n for g in groups if g["weight_decay"] == 0.0 for n in g["param_names"]]
    assert sorted(no_decay) == ["0.bias", "1.bias", "1.weight", "2.bias"]
    groups = triton_adam.param_groups(model, 0.05, lr=1e-3, lr_multipliers={r"^2\.": 10.0})
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["2.weight"]["lr"] == pytest.approx(1e-2)
    assert by_name["0.weight"]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="base lr"):
        triton_adam.param_groups(model, 0.05, lr_multipliers={"x": 2.0})


def test_normalized_weight_decay():
    # the AdamW paper: lambda = lambda_norm * sqrt(b / (B*T))
    assert triton_adam.normalized_weight_decay(0.05, 128, 50000 * 100) == pytest.approx(
        0.05 * math.sqrt(128 / 5e6))
    with pytest.raises(ValueError):
        triton_adam.normalized_weight_decay(0.05, 0, 10)


def test_bad_formulation_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="eps_mode"):
        triton_adam.AdamW(p, eps_mode="keras")
    with pytest.raises(ValueError, match="weight_decay_mode"):
        triton_adam.AdamW(p, weight_decay_mode="paper")
    with pytest.raises(ValueError, match="max_grad_norm"):
        triton_adam.AdamW(p, max_grad_norm=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", [dict(eps_mode="paper"), dict(bias_correction=False),
                                     dict(weight_decay_mode="schedule"),
                                     dict(skip_nonfinite=True, amsgrad=True)],
                         ids=["paper", "no-bias-correction", "schedule", "skip"])
def test_triton_and_torch_backends_give_the_same_bits(dtype, options):
    from triton_adam._plan import interpreter_enabled
    if not interpreter_enabled():
        pytest.skip("compares the Triton kernels on CPU tensors (interpreter)")
    skip_if_fma_rounds_twice(dtype)
    generator = torch.Generator().manual_seed(21)
    initial = torch.randn(3008, generator=generator).to(dtype)  # see the tail note in
    # test_optimizer_parity.test_bit_identical_to_torch_fused_on_cpu
    params = [torch.nn.Parameter(initial.clone()) for _ in range(2)]
    optimizers = [triton_adam.AdamW([p], lr=5e-3, betas=(0.8, 0.99), eps=1e-4,
                                    weight_decay=0.05, backend=backend, **options)
                  for p, backend in zip(params, ("triton", "torch"))]
    for opt in optimizers:
        opt.param_groups[0]["initial_lr"] = 1e-2  # a schedule that has decayed lr by half
    for step in range(5):
        grad = (torch.randn(3008, generator=generator) * 1e-2).to(dtype)
        if step == 2 and "skip_nonfinite" in options:
            grad[5] = float("nan")
        for p in params:
            p.grad = grad.clone()
        for opt in optimizers:
            opt.step()
        assert torch.equal(params[0], params[1])
    if "skip_nonfinite" in options:
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"):
            assert torch.equal(optimizers[0].state[params[0]][key],
                               optimizers[1].state[params[1]][key]), key


# --- the fused clip's norm: float32 whatever the grads' dtype ---------------------------------

FLOAT32_ULP = 2.0 ** -23  # relative spacing of float32 values in [1, 2)
# How far each backend's float32 norm may be from the exact one: the Triton reduction sums
# blocks (within an ulp here); the torch backend takes torch's float32 norm (as
# torch.nn.utils.clip_grad_norm_ does), which on the CPU sums along vector lanes and drifts
# with the tensor's size (3.6 ulps on these 4096 elements, 1e-4 relative at 4M).
NORM_ULPS = {"triton": 4, "torch": 32}


def _scaled_grads(grad_dtype, scale, seed):
    """Grads whose unscaled norm is above 1 in every tensor, as a GradScaler hands them over
    (multiplied by ``scale``, then in ``grad_dtype``), and the float64 norm they carry."""
    generator = torch.Generator().manual_seed(seed)
    grads = [(torch.randn(n, generator=generator, dtype=torch.float64) * 0.05 * scale)
             .to(grad_dtype) for n in (3000, 517, 4096)]
    exact = torch.linalg.vector_norm(torch.cat([g.double() for g in grads])) / scale
    return grads, exact


@pytest.mark.parametrize("param_dtype,grad_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32)], ids=["fp32", "bf16", "fp16", "bf16-fp32grads",
                                          "fp16-fp32grads"])
@pytest.mark.parametrize("scale", [None, 65536.0], ids=["unscaled", "scaler"])
def test_fused_clip_norm_is_float32_on_both_backends(param_dtype, grad_dtype, scale):
    """The norm is accumulated in float32 for 16-bit grads too (a norm in the grads' dtype
    was 1e-3 off for bfloat16, and inf for float16 grads scaled by a GradScaler, which
    clipped the update to nothing): every backend within float32 ulps of the exact norm
    (NORM_ULPS), under a GradScaler too."""
    grads, exact = _scaled_grads(grad_dtype, scale or 1.0, seed=3)
    for backend in backends_on("cpu"):
        params = [torch.nn.Parameter(torch.randn(g.shape).to(param_dtype)) for g in grads]
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad_dtype = None  # torch >= 2.10 checks .grad's dtype against this
            p.grad = g.clone()
        opt = triton_adam.AdamW(params, lr=1e-2, weight_decay=0.0, max_grad_norm=1.0,
                                backend=backend)
        if scale is None:
            opt.step()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            scaler.scale(torch.ones(()))  # the scale as a backward pass would have made it
            scaler.step(opt)
            scaler.update()
        norm = opt.last_grad_norm
        assert norm.dtype == torch.float32
        torch.testing.assert_close(norm.double(), exact, rtol=NORM_ULPS[backend] * FLOAT32_ULP,
                                   atol=0,
                                   msg=lambda m: f"{backend}: {m}")
        # the update kept its (clipped) gradient
        assert all(not torch.equal(p, b) for p, b in zip(params, before)), backend
