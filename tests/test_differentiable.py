"""differentiable=True: autograd through the step, the same graph as torch.optim's."""
import copy

import pytest
import torch
from torch.autograd import gradcheck

import triton_adam
from conftest import backends_on

CLASSES = [(triton_adam.Adam, torch.optim.Adam), (triton_adam.AdamW, torch.optim.AdamW)]
FLAGS = [{}, {"amsgrad": True}, {"maximize": True, "weight_decay": 0.1},
         {"weight_decay": 0.1, "lr": 0.01}, {"lr": torch.tensor(0.01)},
         {"capturable": False, "betas": (0.8, 0.9)}]


def flag_id(kwargs):
    return "-".join(f"{k}={v}" for k, v in kwargs.items()) or "default"


def stepped(cls, kwargs, param, grad, state_tensors, steps=1):
    """The param and the grad-requiring states after ``steps`` differentiable steps from a
    fresh clone of ``param`` with grad ``grad`` (halved at each later step) and, if given,
    ``state_tensors`` (exp_avg, exp_avg_sq, max_exp_avg_sq) at step 10."""
    param = param.clone()
    optimizer = cls([param], differentiable=True, **kwargs)
    if state_tensors:
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        optimizer.state[param].update(
            {"step": torch.tensor(10.0), **{k: t.clone() for k, t in zip(keys, state_tensors)}})
    for step in range(steps):
        param.grad = grad * 0.5**step
        optimizer.step()
    return (param,) + tuple(v for v in optimizer.state[param].values()
                            if isinstance(v, torch.Tensor) and v.requires_grad)


def double_inputs(n_states=3):
    return [torch.rand(10, dtype=torch.float64, requires_grad=True) for _ in range(2 + n_states)]


@pytest.mark.parametrize("ours,theirs", CLASSES, ids=["Adam", "AdamW"])
@pytest.mark.parametrize("kwargs", FLAGS, ids=flag_id)
def test_step_gradients_are_torchs(ours, theirs, kwargs):
    # the differentiable step of both, one step from a loaded state (as torch's gradcheck test)
    # and two from scratch: the outputs and their gradients with respect to param, grad and
    # the states bit for bit
    param, grad, *states = double_inputs()
    for steps, given in ((1, states), (1 if kwargs.get("amsgrad") else 2, [])):
        inputs = (param, grad, *given)
        ours_out = stepped(ours, dict(kwargs, backend="torch"), param, grad, given, steps)
        theirs_out = stepped(theirs, kwargs, param, grad, given, steps)
        for a, b in zip(ours_out, theirs_out, strict=True):
            assert torch.equal(a, b)
        weights = [torch.randn_like(t) for t in ours_out]
        ours_grads = torch.autograd.grad(ours_out, inputs, weights, allow_unused=True)
        theirs_grads = torch.autograd.grad(theirs_out, inputs, weights, allow_unused=True)
        for a, b in zip(ours_grads, theirs_grads, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("ours,theirs", CLASSES, ids=["Adam", "AdamW"])
@pytest.mark.parametrize("kwargs", [{}, {"amsgrad": True, "weight_decay": 0.1}],
                         ids=flag_id)
def test_gradcheck(ours, theirs, kwargs):
    param, grad, *states = double_inputs()
    assert gradcheck(lambda *inputs: stepped(ours, dict(kwargs, backend="torch"), *inputs[:2],
                                             inputs[2:]), (param, grad, *states))


@pytest.mark.parametrize("ours,theirs", CLASSES, ids=["Adam", "AdamW"])
def test_hyperparameter_gradients_are_torchs(ours, theirs):
    # meta-gradients: two steps, then the loss's gradient with respect to tensor lr,
    # weight_decay and betas
    def meta_loss(cls, **extra):
        hyper = {"lr": torch.tensor(0.01, dtype=torch.float64, requires_grad=True),
                 "weight_decay": torch.tensor(0.3, dtype=torch.float64, requires_grad=True)}
        betas = (torch.tensor(0.9, dtype=torch.float64, requires_grad=True),
                 torch.tensor(0.99, dtype=torch.float64, requires_grad=True))
        torch.manual_seed(3)
        param = torch.rand(10, dtype=torch.float64, requires_grad=True).clone()
        target = torch.rand(10, dtype=torch.float64)
        optimizer = cls([param], betas=betas, differentiable=True, **hyper, **extra)
        for _ in range(2):
            loss = (param - target).pow(2).sum()
            loss.backward(inputs=(param,), create_graph=True)
            optimizer.step()
            optimizer.zero_grad()
        loss = (param - target).pow(2).sum()
        return loss, torch.autograd.grad(loss, [*hyper.values(), *betas])

    ours_loss, ours_grads = meta_loss(ours, backend="torch")
    theirs_loss, theirs_grads = meta_loss(theirs)
    assert torch.equal(ours_loss, theirs_loss)
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        assert torch.equal(a, b) and a.abs().sum() > 0


def test_non_leaf_params_only_when_differentiable():
    leaf = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="can't optimize a non-leaf Tensor"):
        triton_adam.Adam([leaf * 2], backend="torch")
    twin_leaf = leaf.detach().clone().requires_grad_()
    strided, twin = (leaf * 2)[:, ::2], (twin_leaf * 2)[:, ::2]
    ours = triton_adam.Adam([strided], differentiable=True, backend="torch")
    theirs = torch.optim.Adam([twin], differentiable=True)
    grad = torch.randn(4, 2)
    strided.grad, twin.grad = grad, grad.clone()
    ours.step()
    theirs.step()
    assert torch.equal(strided, twin)
    (ours_grad,) = torch.autograd.grad(strided.sum(), leaf)
    (theirs_grad,) = torch.autograd.grad(twin.sum(), twin_leaf)
    assert torch.equal(ours_grad, theirs_grad) and ours_grad.abs().sum() > 0


@pytest.mark.parametrize("option,value", [
    ("state_dtype", "int8"), ("state_dtype", torch.bfloat16), ("master_weights", True),
    ("kahan_summation", True), ("stochastic_rounding", True), ("eps_mode", "paper"),
    ("bias_correction", False), ("weight_decay_mode", "schedule"),
    ("max_grad_norm", 1.0), ("skip_nonfinite", True)])
def test_refuses_options_torch_does_not_have(option, value):
    param = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=option):
        triton_adam.AdamW([param], differentiable=True, backend="torch", **{option: value})
    optimizer = triton_adam.AdamW([param], backend="torch", **{option: value})
    with pytest.raises(ValueError, match=option):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))],
                                   "differentiable": True})
    assert len(optimizer.param_groups) == 1


def test_fused_and_differentiable_is_torchs_error():
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        triton_adam.Adam([torch.nn.Parameter(torch.randn(3))], fused=True, differentiable=True)


def test_step_count_requiring_grad_is_torchs_error():
    param = torch.randn(5, requires_grad=True).clone()
    optimizer = triton_adam.Adam([param], differentiable=True, backend="torch")
    param.grad = torch.randn(5)
    optimizer.step()
    optimizer.state[param]["step"] = torch.tensor(1.0, requires_grad=True)
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match="`requires_grad` is not supported for `step`"):
        optimizer.step()
    assert torch.equal(param, before)


@pytest.mark.parametrize("backend", backends_on("cpu"))
def test_mixed_groups_step_each_as_torch(backend):
    # group 0 differentiable (through torch's implementation), group 1 fused: each as
    # torch.optim steps it; the plan holds nothing of group 0, whose param is a strided
    # non-leaf the kernels could not take
    torch.manual_seed(0)
    leaf = torch.randn(6, 8, requires_grad=True)
    fused = torch.nn.Parameter(torch.randn(37, 5))
    twin = torch.nn.Parameter(fused.detach().clone())
    diff_param = (leaf * 1.5)[:, ::2]
    diff_twin = (leaf * 1.5)[:, ::2]
    # (torch accepts non-leaf params by the optimizer's default, as here)
    ours = triton_adam.AdamW([{"params": [diff_param], "amsgrad": True},
                              {"params": [fused], "lr": 0.01, "differentiable": False}],
                             differentiable=True, backend=backend)
    diff_theirs = torch.optim.AdamW([diff_twin], differentiable=True, amsgrad=True)
    fused_theirs = torch.optim.AdamW([twin], lr=0.01)
    for step in range(3):
        grad, fused_grad = torch.randn(6, 4), torch.randn(37, 5)
        diff_param.grad, diff_twin.grad = grad, grad.clone()
        fused.grad, twin.grad = fused_grad, fused_grad.clone()
        ours.step()
        diff_theirs.step()
        fused_theirs.step()
        assert torch.equal(diff_param, diff_twin)
        torch.testing.assert_close(fused, twin, rtol=1e-6, atol=1e-7)
    assert all(m.param is not diff_param for m in ours._plan.members)
    ours_grad, = torch.autograd.grad(diff_param.sum(), leaf)
    theirs_grad, = torch.autograd.grad(diff_twin.sum(), leaf)
    assert torch.equal(ours_grad, theirs_grad)


def detached(state_dict):
    """A differentiable optimizer's state dict without its autograd history (torch's
    non-leaf state tensors refuse deepcopy and torch.save)."""
    return {"state": {k: {n: t.detach().clone() for n, t in s.items()}
                      for k, s in state_dict["state"].items()},
            "param_groups": copy.deepcopy(state_dict["param_groups"])}


def test_state_dict_round_trip():
    torch.manual_seed(1)
    leaves = [torch.randn(7, 3, requires_grad=True) for _ in range(2)]
    grads = [[torch.randn(7, 3) for _ in leaves] for _ in range(6)]
    kwargs = dict(lr=0.05, amsgrad=True, differentiable=True)

    def run(cls, steps, state_dict=None, **extra):
        params = [leaf.clone() for leaf in leaves]
        optimizer = cls(params, **extra, **kwargs)
        if state_dict is not None:
            optimizer.load_state_dict(state_dict)
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            optimizer.step()
        return params, optimizer

    _, ours = run(triton_adam.Adam, grads[:3], backend="torch")
    saved = detached(ours.state_dict())
    assert saved["param_groups"][0]["differentiable"] is True
    _, theirs = run(torch.optim.Adam, grads[:3])
    for key, value in detached(theirs.state_dict())["state"][0].items():
        assert torch.equal(saved["state"][0][key], value), key
    # from the saved state, ours and torch's differentiable Adam go on alike, both from
    # one another's state dict
    ours_params, _ = run(triton_adam.Adam, grads[3:], copy.deepcopy(saved), backend="torch")
    theirs_params, _ = run(torch.optim.Adam, grads[3:], copy.deepcopy(saved))
    mixed_params, _ = run(triton_adam.Adam, grads[3:], detached(theirs.state_dict()),
                          backend="torch")
    for a, b, c in zip(ours_params, theirs_params, mixed_params):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_grad_scaler_protocol_unscales_and_skips():
    # GradScaler hands our optimizer grad_scale / found_inf instead of unscaling: the
    # differentiable groups unscale as GradScaler.unscale_ would, and skip on found_inf
    base = torch.randn(9, requires_grad=True)
    param, twin = base.clone(), base.detach().clone().requires_grad_().clone()
    ours = triton_adam.Adam([param], differentiable=True, backend="torch")
    theirs = torch.optim.Adam([twin], differentiable=True)
    scale = torch.tensor(2.0**10)
    for step, inf in enumerate([0.0, 1.0, 0.0]):
        grad = torch.randn(9)
        param.grad = grad * scale
        twin.grad = (grad * scale) * scale.double().reciprocal().float()
        ours.grad_scale, ours.found_inf = scale, torch.tensor(inf)
        before = param.detach().clone()
        ours.step()
        if inf:
            assert torch.equal(param, before)
        else:
            theirs.step()
        assert torch.equal(param, twin)
    assert ours.state[param]["step"].item() == 2
