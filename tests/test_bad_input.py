"""Bad input: a clear error naming the param and the problem, and nothing modified."""
import copy

import pytest
import torch

import triton_adam
from conftest import DEVICE_BACKENDS


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1e-3), "Invalid learning rate"),
    (dict(eps=-1.0), "Invalid epsilon"),
    (dict(weight_decay=-0.1), "Invalid weight_decay"),
    (dict(betas=(1.0, 0.999)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(betas=(0.9, torch.tensor(0.99))), "both floats or both Tensors"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), "Tensor lr must be 1-element"),
    (dict(differentiable=True, state_dtype="int8"), "differentiable=True.*state_dtype"),
])
@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_invalid_hyperparameters(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(triton_adam, cls)([torch.nn.Parameter(torch.randn(3))], **kwargs)


@pytest.mark.parametrize("kwargs", [dict(lr=torch.tensor(1e-2)),
                                    dict(betas=(torch.tensor(0.9), torch.tensor(0.99)))],
                         ids=["lr", "betas"])
def test_tensor_hyperparameters_with_foreach_are_the_one_validation_difference(kwargs):
    """The README's one exception to torch's validation errors: torch refuses a tensor lr or
    betas with foreach=True (capturable=False); foreach is ignored here, so they are taken."""
    params = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="as a Tensor is not supported"):
        torch.optim.AdamW(params, foreach=True, **kwargs)
    triton_adam.AdamW(params, foreach=True, **kwargs)


def test_invalid_hyperparameters_in_a_later_group():
    opt = triton_adam.AdamW([torch.nn.Parameter(torch.randn(3))])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_empty_and_bad_param_lists():
    with pytest.raises(ValueError, match="empty parameter list"):
        triton_adam.AdamW([])
    with pytest.raises(TypeError, match="param 0 of group 0"):
        triton_adam.AdamW([torch.zeros(3, dtype=torch.int64)])
    # elements sharing memory (torch's in-place ops refuse them at the first step); a view
    # with gaps is stepped (test_optimizer_behaviour)
    expanded = torch.nn.Parameter(torch.randn(1, 8).expand(4, 8))
    with pytest.raises(ValueError, match=r"param 0 of group 0 \(shape \(4, 8\).*overlaps "):
        triton_adam.AdamW([expanded])
    triton_adam.AdamW([torch.nn.Parameter(torch.randn(4, 8)[:, ::2])])


def snapshot(params, optimizer):
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict())


def assert_untouched(params, optimizer, before):
    values, state_dict = before
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    after = optimizer.state_dict()
    assert after["state"].keys() == state_dict["state"].keys()
    for index, state in after["state"].items():
        for key, value in state.items():
            assert torch.equal(value, state_dict["state"][index][key])


def params_with_one_step(device, backend):
    generator = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(device))
              for s in [(5, 3), (7,), (2, 2)]]
    opt = triton_adam.AdamW(params, lr=1e-2, backend=backend)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    opt.step()
    # a fourth param that has no state yet: a refused step must not create it either
    extra = torch.nn.Parameter(torch.randn(4, generator=generator).to(device))
    opt.add_param_group({"params": [extra]})
    params.append(extra)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(device)
    return params, opt


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("corrupt,error,match", [
    (lambda ps: setattr(ps[1].grad, "data", torch.randn(9, device=ps[1].device)),
     ValueError, r"param 1 of group 0 \(shape \(7,\).*grad has shape \(9,\)"),
    (lambda ps: setattr(ps[0].grad, "data", ps[0].grad.data.double()),
     TypeError, r"param 0 of group 0.*grad has dtype torch.float64"),
    (lambda ps: setattr(ps[1], "grad", ps[1].grad.to_sparse()),
     RuntimeError, "sparse gradients"),
], ids=["grad-shape", "grad-dtype", "sparse-grad"])
def test_bad_grads_refused_before_anything_changes(device, backend, corrupt, error, match):
    params, opt = params_with_one_step(device, backend)
    corrupt(params)
    before = snapshot(params, opt)
    with pytest.raises(error, match=match):
        opt.step()
    assert_untouched(params, opt, before)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_bad_loaded_state_refused_before_anything_changes(device, backend):
    params, opt = params_with_one_step(device, backend)
    opt.state[params[0]]["exp_avg"] = torch.zeros(2, device=device)
    opt._invalidate_plan()
    before = snapshot(params, opt)
    with pytest.raises(ValueError, match=r"param 0 of group 0.*'exp_avg' has shape \(2,\)"):
        opt.step()
    assert_untouched(params, opt, before)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_params_sharing_memory_refused(device, backend):
    base = torch.randn(10, device=device)
    first, second = torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])
    opt = triton_adam.AdamW([first, second], backend=backend)
    first.grad, second.grad = torch.randn(6, device=device), torch.randn(6, device=device)
    before = base.clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.step()
    assert torch.equal(base, before)
    assert len(opt.state) == 0


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_zero_element_and_gradless_params_just_work(device, backend):
    empty = torch.nn.Parameter(torch.randn(0, 5, device=device))
    full = torch.nn.Parameter(torch.randn(3, device=device))
    idle = torch.nn.Parameter(torch.randn(3, device=device))
    opt = triton_adam.AdamW([empty, full, idle], backend=backend)
    empty.grad, full.grad = torch.randn(0, 5, device=device), torch.randn(3, device=device)
    opt.step()
    assert opt.state[empty]["step"].item() == 1
    assert idle not in opt.state


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_meta_params_are_accepted_then_refused_at_step(backend):
    """torch.optim builds over meta params; so do we. A step over them says what is wrong
    (they have no memory; it said "share memory": every meta tensor reports address 0)."""
    with torch.device("meta"):
        model = torch.nn.Linear(4, 3)
    torch.optim.AdamW(model.parameters())
    opt = triton_adam.AdamW(model.parameters(), lr=1e-2, backend=backend)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match=r"param 0 of group 0 \(shape \(3, 4\).*meta device"):
        opt.step()
    assert not opt.state
    opt.zero_grad()
    opt.step()  # without grads there is nothing to step, as in torch
