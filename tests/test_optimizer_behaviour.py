"""GradScaler, capturable, state_dict interchange, table caching and backend choice."""
import copy
import io

import pytest
import torch

import triton_adam
from conftest import DEVICE_BACKENDS


def make_model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(),
                               torch.nn.Linear(31, 5)).to(device)


def loss_of(model, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(17, 13, generator=generator).to(next(model.parameters()).device)
    return model(x).pow(2).mean()


def train(model, optimizer, steps, first_seed=0, scaler=None, poison_step=None):
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, first_seed + step)
        if scaler is None:
            loss.backward()
            optimizer.step()
            continue
        scaler.scale(loss).backward()
        if step == poison_step:
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(optimizer)
        scaler.update()


def assert_same_params(a, b, **tolerance):
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, **tolerance)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scaler_unscales_and_skips_like_torch_fused(device, backend):
    ours, theirs = make_model(device), make_model(device)
    ours_opt = triton_adam.AdamW(ours.parameters(), lr=1e-2, backend=backend)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, fused=True)
    ours_scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    torch_scaler = torch.amp.GradScaler(device, init_scale=2.0**12)
    train(ours, ours_opt, 3, scaler=ours_scaler)
    train(theirs, torch_opt, 3, scaler=torch_scaler)
    before = copy.deepcopy(ours_opt.state_dict()["state"])
    params_before = [p.detach().clone() for p in ours.parameters()]
    # an overflow: the whole update is skipped, step counts included, bit for bit
    train(ours, ours_opt, 1, first_seed=3, scaler=ours_scaler, poison_step=0)
    train(theirs, torch_opt, 1, first_seed=3, scaler=torch_scaler, poison_step=0)
    for p, q in zip(ours.parameters(), params_before):
        assert torch.equal(p, q)
    for index, state in ours_opt.state_dict()["state"].items():
        for key, value in state.items():
            assert torch.equal(value, before[index][key]), key
    assert ours_scaler.get_scale() == torch_scaler.get_scale() == 2.0**11
    train(ours, ours_opt, 3, first_seed=4, scaler=ours_scaler)
    train(theirs, torch_opt, 3, first_seed=4, scaler=torch_scaler)
    assert_same_params(ours, theirs, rtol=1e-5, atol=1e-6)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert ours_opt.state[p]["step"].item() == torch_opt.state[q]["step"].item() == 6


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_grad_scaler_after_explicit_unscale(device, backend):
    """scaler.unscale_ then clipping then step: found_inf alone reaches the kernel."""
    ours, theirs = make_model(device), make_model(device)
    ours_opt = triton_adam.Adam(ours.parameters(), lr=1e-2, backend=backend)
    torch_opt = torch.optim.Adam(theirs.parameters(), lr=1e-2, foreach=False)
    for model, opt in ((ours, ours_opt), (theirs, torch_opt)):
        scaler = torch.amp.GradScaler(device, init_scale=256.0)
        for step in range(4):
            opt.zero_grad()
            scaler.scale(loss_of(model, step)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            scaler.step(opt)
            scaler.update()
    assert_same_params(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("direction", ["torch->ours", "ours->torch"])
def test_state_dict_interchange(device, backend, direction):
    first, second = make_model(device), make_model(device)
    make_ours = lambda m: triton_adam.AdamW(m.parameters(), lr=1e-2, amsgrad=True,  # noqa: E731
                                            backend=backend)
    make_torch = lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2,  # noqa: E731
                                             amsgrad=True, foreach=False)
    source_factory, target_factory = ((make_torch, make_ours) if direction == "torch->ours"
                                      else (make_ours, make_torch))
    source = source_factory(first)
    train(first, source, 3)
    # save through bytes with map_location="cpu", as a checkpoint would be
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": source.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, map_location="cpu")
    second.load_state_dict(checkpoint["model"])
    target = target_factory(second)
    target.load_state_dict(checkpoint["opt"])
    train(first, source, 3, first_seed=3)
    train(second, target, 3, first_seed=3)
    assert_same_params(first, second, rtol=1e-5, atol=1e-6)
    for p in second.parameters():
        assert target.state[p]["step"].item() == 6
        assert set(target.state[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    if direction == "torch->ours":
        for p in second.parameters():
            step = target.state[p]["step"]
            assert step.dtype == torch.float32 and step.dim() == 0 and step.device == p.device


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_tensor_lr_is_read_at_every_step(device, backend):
    """capturable=True with a tensor lr: changing the tensor in place changes the next step."""
    ours, theirs = make_model(device), make_model(device)
    lr = torch.tensor(1e-2, device=device)
    ours_opt = triton_adam.AdamW(ours.parameters(), lr=lr, capturable=True, backend=backend)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    for step in range(4):
        lr.fill_(1e-2 / (step + 1))
        for group in torch_opt.param_groups:
            group["lr"] = 1e-2 / (step + 1)
        train(ours, ours_opt, 1, first_seed=step)
        train(theirs, torch_opt, 1, first_seed=step)
    assert_same_params(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_lr_scheduler_drives_the_optimizer_like_torch(device, backend):
    ours, theirs = make_model(device), make_model(device)
    ours_opt = triton_adam.AdamW(ours.parameters(), lr=1e-2, backend=backend)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    schedulers = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=3e-2, total_steps=6)
                  for o in (ours_opt, torch_opt)]
    for step in range(6):
        train(ours, ours_opt, 1, first_seed=step)
        train(theirs, torch_opt, 1, first_seed=step)
        for s in schedulers:
            s.step()
    assert_same_params(ours, theirs, rtol=1e-5, atol=1e-6)


def test_tables_are_cached_and_rebuilt_only_when_params_change():
    model = make_model("cpu")
    opt = triton_adam.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, 2)
    plan = opt._plan
    train(model, opt, 2, first_seed=2)  # new grads every step (set_to_none): same plan
    assert opt._plan is plan
    model[0].bias.grad = None  # one param without a grad: a new plan
    opt.step()
    assert opt._plan is not plan
    opt.load_state_dict(opt.state_dict())
    assert opt._plan is None


def test_coefficient_table_poisoned_then_fully_written():
    pytest.importorskip("triton")
    from triton_adam._plan import interpreter_enabled
    if not interpreter_enabled():
        pytest.skip("needs the Triton interpreter on CPU")
    model = make_model("cpu")
    opt = triton_adam.AdamW(model.parameters(), lr=1e-2, backend="triton")
    reference = make_model("cpu")
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    train(model, opt, 1)
    train(reference, ref_opt, 1)
    bucket = opt._plan.triton_buckets[0]
    bucket.coef_table.fill_(float("nan"))
    train(model, opt, 2, first_seed=1)
    train(reference, ref_opt, 2, first_seed=1)
    assert_same_params(model, reference, rtol=1e-5, atol=1e-6)


def test_backend_selection(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    params[0].grad = torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        triton_adam.AdamW(params, backend="cuda")
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):
        triton_adam.AdamW(params, backend="triton").step()
    before = params[0].detach().clone()
    triton_adam.AdamW(params).step()  # auto: float64 goes to torch's kernels
    assert not torch.equal(params[0], before)
    monkeypatch.setattr("triton_adam._plan.interpreter_enabled", lambda: False)
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_adam.AdamW([p], backend="triton").step()
    opt = triton_adam.AdamW([p])  # auto without the interpreter: torch's fused CPU kernel
    opt.step()
    assert opt._plan.torch_buckets and not opt._plan.triton_buckets


def test_is_a_torch_optimizer_with_torch_defaults():
    params = [torch.nn.Parameter(torch.randn(3))]
    opt = triton_adam.AdamW(params)
    ref = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))])
    assert isinstance(opt, torch.optim.Optimizer)
    for key in ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "capturable"):
        assert opt.defaults[key] == ref.defaults[key], key
    assert triton_adam.Adam(params).defaults["weight_decay"] == 0


def test_named_parameters_work():
    model = make_model("cpu")
    opt = triton_adam.AdamW(model.named_parameters(), lr=1e-2)
    train(model, opt, 2)
    assert "param_names" in opt.state_dict()["param_groups"][0]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_replaced_or_cleared_state_is_followed_like_torch(device, backend):
    """Replacing a state tensor (e.g. moving state) or clearing the state must not leave the
    kernels writing through the old tensors' addresses."""
    ours, theirs = make_model(device), make_model(device)
    ours_opt = triton_adam.AdamW(ours.parameters(), lr=1e-2, backend=backend)
    torch_opt = torch.optim.AdamW(theirs.parameters(), lr=1e-2, foreach=False)
    train(ours, ours_opt, 2)
    train(theirs, torch_opt, 2)
    for opt in (ours_opt, torch_opt):
        for state in opt.state.values():
            state["exp_avg"] = state["exp_avg"].clone()
            state["exp_avg_sq"] = state["exp_avg_sq"] * 1.0
    train(ours, ours_opt, 2, first_seed=2)
    train(theirs, torch_opt, 2, first_seed=2)
    assert_same_params(ours, theirs, rtol=1e-5, atol=1e-6)
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(ours_opt.state[p]["exp_avg"], torch_opt.state[q]["exp_avg"])
    ours_opt.state.clear()
    torch_opt.state.clear()
    train(ours, ours_opt, 2, first_seed=4)
    train(theirs, torch_opt, 2, first_seed=4)
    assert_same_params(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(s["step"].item() == 2 for s in ours_opt.state.values())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_conjugated_complex_grad_is_read_as_its_value(device, backend):
    generator = torch.Generator().manual_seed(5)
    value = torch.randn(6, generator=generator, dtype=torch.complex64).to(device)
    grad = torch.randn(6, generator=generator, dtype=torch.complex64).to(device)
    lazy, eager = torch.nn.Parameter(value.clone()), torch.nn.Parameter(value.clone())
    lazy.grad, eager.grad = grad.conj(), grad.conj().resolve_conj()
    assert lazy.grad.is_conj()
    for p in (lazy, eager):
        triton_adam.AdamW([p], lr=1e-2, backend=backend).step()
    assert torch.equal(lazy, eager)


def test_nonfinite_flag_does_not_wrap_past_int32():
    from triton_adam._plan import interpreter_enabled
    if not interpreter_enabled():
        pytest.skip("runs the finalize kernel on CPU tensors (interpreter)")
    from triton_adam.kernels import grad_norm as N
    partials = torch.full((3,), float("nan"))
    counts = torch.full((3,), 2**30 + 1, dtype=torch.int32)  # a sum would wrap negative
    norm, flag = torch.empty(()), torch.empty(())
    N.launch_grad_norm_finalize(partials, counts, 3, norm, flag, 2)
    assert flag.item() == 1.0 and torch.isnan(norm)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_params_only_the_optimizer_holds(device, backend):
    """A param the optimizer alone references: without state (a scheduler driven with no model,
    as people plot schedules) steps are no-ops, as in torch; once stepped and then left without
    a grad and without any other reference (replaced in the model), the step raises."""
    opt = triton_adam.AdamW([torch.nn.Parameter(torch.ones(3, device=device))], lr=0.1,
                            backend=backend)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)
    torch.testing.assert_close(opt.param_groups[0]["params"][0], torch.ones(3, device=device))

    model = torch.nn.Linear(3, 2).to(device)
    opt = triton_adam.AdamW(model.parameters(), lr=0.1, backend=backend)
    model(torch.randn(4, 3, device=device)).sum().backward()
    opt.step()
    opt.zero_grad()
    opt.step()  # no grads, params still in the model: a no-op
    weight_before = model.weight.detach().clone()
    model.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()},
                          assign=True)
    model(torch.randn(4, 3, device=device)).sum().backward()
    with pytest.raises(RuntimeError, match="replaced by another Parameter object"):
        opt.step()
    torch.testing.assert_close(model.weight.detach(), weight_before)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("state_dtype", [None, "int8"], ids=["dense", "int8"])
def test_state_entries_that_are_not_params_are_kept_like_torch(device, backend, state_dtype):
    """torch's own tests put ``optimizer.state["test"] = 1`` from a state_dict pre-hook: the
    entry is returned as it is, loads back, and the steps go on around it."""
    params = [torch.nn.Parameter(torch.randn(5000, device=device)) for _ in range(2)]
    opt = triton_adam.AdamW(params, lr=1e-2, backend=backend, state_dtype=state_dtype)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.register_state_dict_pre_hook(lambda optimizer: optimizer.state.update(test=1))
    saved = opt.state_dict()
    assert saved["state"]["test"] == 1 and set(saved["state"]) == {0, 1, "test"}
    assert opt.state_bytes() > 0
    opt.step()
    again = triton_adam.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params],
                              lr=1e-2, backend=backend, state_dtype=state_dtype)
    again.load_state_dict(saved)
    assert again.state["test"] == 1
    reference = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    reference.load_state_dict(saved)
    assert reference.state["test"] == 1


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_a_plain_number_step_loads_like_torch(device, backend):
    """Old checkpoints hold ``step`` as a plain number: torch turns 3.0 into tensor(4.) at the
    next step; so do we (on a CPU param the new tensor was built, then dropped)."""
    model, twin = make_model(device), make_model(device)
    ours = triton_adam.AdamW(model.parameters(), lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    for net, opt in ((model, ours), (twin, theirs)):
        train(net, opt, 3)
        saved = copy.deepcopy(opt.state_dict())
        for state in saved["state"].values():
            state["step"] = float(state["step"])
        opt.load_state_dict(saved)
        train(net, opt, 2, first_seed=3)
    assert_same_params(model, twin, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), twin.parameters()):
        step = ours.state[p]["step"]
        assert step.dtype == torch.float32 and step.dim() == 0 and step.device == p.device
        assert step.item() == theirs.state[q]["step"].item() == 5.0


def _views_with_gaps(seed):
    """Params that are strided views with gaps between their elements (torch steps them), and
    a dense one beside them."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(10, 5, 2, generator=generator)[..., 0],
            torch.randn(8, 6, generator=generator)[:, ::2].t(),
            torch.randn(7, generator=generator)]


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True, maximize=True, weight_decay=0.1),
                                     dict(max_grad_norm=0.5),
                                     dict(state_dtype="int8", min_quantized_numel=8)],
                         ids=["plain", "amsgrad-maximize", "clip", "int8"])
def test_params_with_gaps_in_memory_step_like_torch(device, backend, options):
    """A strided view with gaps (``Parameter(torch.randn(10, 5, 2)[..., 0])``) is stepped where
    it lies with torch ops (int8 groups give it float32 moments), beside dense params: torch's
    numbers; its state dict loads back (ours and torch's) and continues alike."""
    def make():
        return [torch.nn.Parameter(v.to(device)) for v in _views_with_gaps(seed=4)]
    ours, theirs, resumed = make(), make(), make()
    assert not ours[0].is_contiguous() and ours[0].stride() == (10, 2)
    clip = options.get("max_grad_norm")
    torch_options = {k: v for k, v in options.items()
                     if k in ("amsgrad", "maximize", "weight_decay")}
    opt = triton_adam.AdamW(ours, lr=1e-2, backend=backend, **options)
    ref = torch.optim.AdamW(theirs, lr=1e-2, foreach=False, **torch_options)
    generator = torch.Generator().manual_seed(5)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator).to(device) for p in ours]
        if step == 3:  # resume from the state dict of step 3 (and check it loads into torch)
            again = triton_adam.AdamW(resumed, lr=1e-2, backend=backend, **options)
            again.load_state_dict(copy.deepcopy(opt.state_dict()))
            for p, q in zip(resumed, ours):
                p.data.copy_(q)
                p.grad = None
            torch.optim.AdamW(make(), **torch_options).load_state_dict(
                copy.deepcopy(opt.state_dict()))
        for p, q, r, g in zip(ours, theirs, resumed, grads):
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.clone()
        opt.step()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(theirs, clip)
        ref.step()
    again.step()
    for p, q, r in zip(ours, theirs, resumed):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        assert torch.equal(p, r)
        assert p.stride() == r.stride() == q.stride()
        assert opt.state[p]["step"].item() == 4
        assert opt.state[p]["exp_avg"].dtype == torch.float32  # int8: the views' moments
