"""The steady-state step (triton_adam._steady_step): after one fully checked step, steps that only
see new grad contents skip the per-tensor checks; every check must still fire when something
else changes, however many steady steps came before.

Each test runs STEADY steps that must all take the steady path (counted), then changes one thing
and checks the next step: the clear error naming the param, or the checked path's rebuild and
torch's numbers.
"""
import copy

import pytest
import torch

import triton_adam
from conftest import backends_on
from triton_adam import _steady_step
from triton_adam._tracked_state import TrackedState
from triton_adam.optimizer import _FusedAdamBase

STEADY = 12
BACKENDS = backends_on("cpu")
# float32 state and params on both backends: torch's fused CPU kernel is the yardstick
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(params=["tensor-guard", "passes"], autouse=True)
def grad_check(request, monkeypatch):
    """Every test twice: grads checked by dynamo's C++ tensor guard, and by the per-property
    passes used where a torch has no such guard."""
    if request.param == "passes":
        monkeypatch.setattr(_steady_step, "_tensor_guard", lambda grads: None)
    return request.param


@pytest.fixture
def checked_steps(monkeypatch):
    """A list that grows by one at every fully checked step."""
    calls = []
    original = _FusedAdamBase._checked_step

    def counting(self):
        calls.append(1)
        return original(self)

    monkeypatch.setattr(_FusedAdamBase, "_checked_step", counting)
    return calls


def _pair(backend, shapes=((5, 7), (13,), (3, 4, 2), (1,)), fused=True):
    """Our AdamW and torch's AdamW (fused, or its for-loop) on copies of fresh random params."""
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = triton_adam.AdamW(params, lr=0.01, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(reference, lr=0.01, weight_decay=0.1,
                               **(dict(fused=True) if fused else dict(foreach=False)))
    return params, reference, ours, theirs


def _step_both(params, reference, ours, theirs, fresh=True, grads=None):
    grads = grads or [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, reference, grads):
        if fresh or p.grad is None:
            p.grad, q.grad = g.clone(), g.clone()
        else:
            p.grad.copy_(g)
            q.grad.copy_(g)
    ours.step()
    theirs.step()


def _assert_match(params, reference):
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, **TOLERANCE)


def _run_steady(params, reference, ours, theirs, checked_steps, fresh=True):
    """One checked step, then STEADY steady ones (asserted), all matching torch."""
    _step_both(params, reference, ours, theirs, fresh)
    before = len(checked_steps)
    for _ in range(STEADY):
        _step_both(params, reference, ours, theirs, fresh)
    assert len(checked_steps) == before, "the steady steps took the checked path"
    _assert_match(params, reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-grads", "same-grads"])
def test_steady_steps_match_torch(backend, fresh, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps, fresh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_another_dtype_is_refused_after_steady_steps(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    before = [p.detach().clone() for p in params]
    params[2].grad.data = params[2].grad.data.to(torch.bfloat16)  # escapes the .grad setter
    with pytest.raises((TypeError, ValueError), match="param 2 of group 0"):
        ours.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "a refused step wrote"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_another_shape_is_refused_after_steady_steps(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    params[0].grad.data = torch.randn(7, 5, 2)
    with pytest.raises((TypeError, ValueError), match="param 0 of group 0"):
        ours.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_of_another_layout_is_refused_after_steady_steps(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    params[1].grad = torch.randn(13).to_sparse()
    with pytest.raises((TypeError, ValueError, RuntimeError), match="param 1 of group 0"):
        ours.step()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grad_on_another_device_is_refused_after_steady_steps(checked_steps):
    params = [torch.nn.Parameter(torch.randn(9, 4, device="cuda")) for _ in range(3)]
    opt = triton_adam.AdamW(params, lr=0.01)
    for _ in range(STEADY + 1):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    params[1].grad.data = torch.randn(9, 4)  # a CPU grad for a CUDA param, past the setter
    with pytest.raises((TypeError, ValueError, RuntimeError), match="param 1 of group 0"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_grad_after_steady_steps_gives_torchs_numbers(backend, checked_steps):
    # torch's for-loop: its fused CPU kernel reads a transposed grad as if it were contiguous
    # (torch 2.13: 0.02 off its own for-loop after one step)
    params, reference, ours, theirs = _pair(backend, shapes=((6, 6), (5,)), fused=False)
    _run_steady(params, reference, ours, theirs, checked_steps)
    grads = [torch.randn(6, 6).t(), torch.randn(5)]  # the setter accepts any strides
    _step_both(params, reference, ours, theirs, grads=grads)
    _assert_match(params, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_state_tensor_after_steady_steps_is_the_one_updated(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    old = ours.state[params[0]]["exp_avg"]
    ours.state[params[0]]["exp_avg"] = old.clone()  # e.g. an offload loop moving states
    before = len(checked_steps)
    _step_both(params, reference, ours, theirs)
    assert len(checked_steps) == before + 1
    torch.testing.assert_close(ours.state[params[0]]["exp_avg"],
                               theirs.state[reference[0]]["exp_avg"], **TOLERANCE)
    assert not torch.equal(ours.state[params[0]]["exp_avg"], old)
    _assert_match(params, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_state_dict_after_steady_steps_is_the_one_updated(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    ours.state[params[3]] = {k: v.clone() for k, v in ours.state[params[3]].items()}
    _step_both(params, reference, ours, theirs)
    assert float(ours.state[params[3]]["step"]) == STEADY + 2
    _assert_match(params, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moved_param_after_steady_steps_is_updated_where_it_is_now(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    params[2].data = params[2].data.clone()  # as module.to() moves params
    _step_both(params, reference, ours, theirs)
    _assert_match(params, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_grad_objects_moved_after_steady_steps_are_read_where_they_are_now(
        backend, checked_steps):
    # the same grad objects (set_to_none=False), one given new memory past the .grad setter:
    # the identity check passes, so the address check must still see it
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps, fresh=False)
    kept = [p.grad for p in params]
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, reference, grads):
        p.grad.copy_(g)
        q.grad.copy_(g)
    old = params[1].grad.data
    params[1].grad.data = old.clone()
    old.fill_(float("nan"))  # what a stale address would read
    ours.step()
    theirs.step()
    assert all(p.grad is k for p, k in zip(params, kept))
    _assert_match(params, reference)
    _step_both(params, reference, ours, theirs, fresh=False)  # and steady at the new address
    _assert_match(params, reference)


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_sets_of_live_grads_taking_turns_give_torchs_numbers(backend, checked_steps):
    # grad objects that stay alive elsewhere and come back: equal ids are the same objects,
    # but the tables point at whichever set the last step used
    params, reference, ours, theirs = _pair(backend)
    sets = [[torch.randn_like(p) for p in params] for _ in range(2)]
    before = len(checked_steps)
    for i in range(3 * _steady_step.REFERENCE_EVERY + 5):
        grads = sets[(i // 3) % 2]  # runs of three steps on each set
        for g in grads:
            g.copy_(torch.randn_like(g))
        for p, q, g in zip(params, reference, grads):
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
        _assert_match(params, reference)
    assert len(checked_steps) == before + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_from_backward_take_the_steady_path(backend, checked_steps):
    # as in training: zero_grad(set_to_none=True), then autograd makes new grads
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    ours = triton_adam.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, backend=backend)
    theirs = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1, fused=True)
    for i in range(STEADY + 1):
        x = torch.randn(4, 6)
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
            opt.step()
        if i == 0:
            before = len(checked_steps)
    assert len(checked_steps) == before, "grads from a backward took the checked path"
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grads_appearing_and_vanishing_after_steady_steps(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    # a param without a grad is skipped, as by torch
    grads = [torch.randn_like(p) for p in params]
    for p, q, g in zip(params, reference, grads):
        p.grad, q.grad = g.clone(), g.clone()
    params[1].grad = reference[1].grad = None
    ours.step()
    theirs.step()
    _assert_match(params, reference)
    for _ in range(3):  # steady again with the missing grad, then it comes back
        _step_both(params[:1] + params[2:], reference[:1] + reference[2:], ours, theirs)
    _step_both(params, reference, ours, theirs)
    _assert_match(params, reference)
    assert float(ours.state[params[1]]["step"]) == float(theirs.state[reference[1]]["step"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_group_flag_after_steady_steps_rebuilds(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    ours.param_groups[0]["maximize"] = theirs.param_groups[0]["maximize"] = True
    _step_both(params, reference, ours, theirs)
    _assert_match(params, reference)
    ours.param_groups[0]["amsgrad"] = True  # (torch's own cannot switch it on mid-run)
    ours.step()
    assert "max_exp_avg_sq" in ours.state[params[0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_hyperparameter_after_steady_steps_is_used(backend, checked_steps):
    params, reference, ours, theirs = _pair(backend)
    _run_steady(params, reference, ours, theirs, checked_steps)
    for opt in (ours, theirs):
        opt.param_groups[0]["lr"] = 0.003
        opt.param_groups[0]["betas"] = (0.8, 0.99)
    _step_both(params, reference, ours, theirs)
    _assert_match(params, reference)


def test_partial_grad_after_steady_steps_is_redistributed(monkeypatch, checked_steps):
    """A DTensor grad whose placements differ from its param's (a Partial grad of a replicated
    param) is redistributed, also after many steady steps (a one-rank world in this process)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        params = [torch.nn.Parameter(distribute_tensor(torch.randn(6, 3), mesh, [Replicate()]))
                  for _ in range(3)]
        opt = triton_adam.AdamW(params, lr=0.01, backend="torch")
        for _ in range(STEADY + 1):
            for p in params:
                p.grad = distribute_tensor(torch.randn(6, 3), mesh, [Replicate()])
            opt.step()
        redistributions = []
        original = DTensor.redistribute

        def counting(self, *args, **kwargs):
            redistributions.append(self.placements)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(DTensor, "redistribute", counting)
        params[1].grad = DTensor.from_local(torch.randn(6, 3), mesh, [Partial()])
        before = len(checked_steps)
        opt.step()
        assert len(checked_steps) == before + 1
        assert any(isinstance(p, Partial) for ps in redistributions for p in ps)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("options", [{}, {"max_grad_norm": 1.0}, {"skip_nonfinite": True}],
                         ids=["plain", "clip", "skip"])
def test_steady_step_python_calls_do_not_grow_with_the_tensors(monkeypatch, options):
    """The host path's regression guard, counted rather than timed: the Python-level calls
    (sys.setprofile's call and c_call events) of a steady Triton step with fresh grads, its
    launches stubbed, are the same for 16 and 512 tensors, within a small constant."""
    import sys

    from triton_adam.kernels import adam_step, grad_norm

    if "triton" not in BACKENDS:
        pytest.skip("the Triton path needs the interpreter here")
    for module, names in ((adam_step, ("launch_adam_step", "launch_adam_coefficients")),
                          (grad_norm, ("launch_grad_norm_partials", "launch_grad_norm_finalize",
                                       "launch_grad_norm_segments"))):
        for name in names:
            monkeypatch.setattr(module, name, lambda *args, **kwargs: None)

    def calls_per_step(n):
        params = [torch.nn.Parameter(torch.randn(4)) for _ in range(n)]
        opt = triton_adam.AdamW(params, lr=0.01, backend="triton", **options)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p in params:
            p.grad = torch.randn_like(p)
        count = [0]

        def profile(frame, event, arg):
            if event in ("call", "c_call"):
                count[0] += 1

        sys.setprofile(profile)
        try:
            opt.step()
        finally:
            sys.setprofile(None)
        return count[0]

    small, large = calls_per_step(16), calls_per_step(512)
    assert large - small <= 8, f"{small} calls for 16 tensors, {large} for 512"


def test_tracked_state_survives_torch_save_and_weights_only_load(tmp_path):
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(2)]
    opt = triton_adam.AdamW(params, lr=0.01, backend="torch")
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert isinstance(opt.state[params[0]], TrackedState)  # counts its changes
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    reference = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params])
    reference.load_state_dict(loaded)
    assert type(loaded["state"][0]) is dict
