"""Every kernel a plan can launch is compiled when the plan is built, before the first launch.

Under the interpreter there is nothing to compile, but the warm-up calls go through the kernels'
``warmup`` exactly as on a GPU, so a compile failure can be planted there, and the warm-up calls
can be compared with the launches.
"""
import pytest
import torch
import triton.language as tl

import triton_adam
from triton_adam.kernels import adam_step as K
from triton_adam.kernels import grad_norm as N
from triton_adam._plan import interpreter_enabled

pytestmark = pytest.mark.skipif(not interpreter_enabled(),
                                reason="plants failures in interpreted kernels (CPU tensors)")

KERNELS = {"coefficients": K.adam_coefficients_kernel, "step": K.adam_step_kernel,
           "partials": N.grad_norm_partials_kernel, "finalize": N.grad_norm_finalize_kernel}


def _params(dtypes, numel=4099):
    generator = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(numel, generator=generator).to(d)) for d in dtypes]
    for p in params:
        p.grad = torch.randn(numel, generator=generator).to(p.dtype)
    return params


def _plant_bf16_compile_failure(monkeypatch):
    """The step kernel's bf16 specialisation (the second bucket here) fails to compile."""
    kernel = K.adam_step_kernel
    original = kernel.warmup

    def warmup(*args, **kwargs):
        if kwargs.get("PARAM_DTYPE") == tl.bfloat16:
            raise RuntimeError("planted compile failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(kernel, "warmup", warmup)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if p in opt.state}


def _assert_unchanged(opt, params, snapshot):
    values, states = snapshot
    for p, before in zip(params, values):
        assert torch.equal(p.detach(), before)
    for p in params:
        if id(p) in states:
            for key, value in states[id(p)].items():
                assert torch.equal(opt.state[p][key], value), key
        else:
            assert p not in opt.state, "a refused step stored new state"


def test_compile_failure_on_second_bucket_leaves_first_untouched(monkeypatch):
    params = _params([torch.float32, torch.bfloat16])
    opt = triton_adam.AdamW(params, lr=1e-2, backend="triton")
    snapshot = _snapshot(opt, params)
    _plant_bf16_compile_failure(monkeypatch)
    with pytest.raises(RuntimeError, match="planted compile failure"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    # once the kernel compiles, the same optimizer steps normally
    monkeypatch.undo()
    opt.step()
    assert not torch.equal(params[0].detach(), snapshot[0][0])
    assert opt.state[params[0]]["step"].item() == 1.0


def test_compile_failure_on_rebuild_leaves_earlier_state_untouched(monkeypatch):
    """A plan rebuilt mid-training (a new param gets its first grad) compiles before launching."""
    params = _params([torch.float32, torch.bfloat16])
    late = params.pop()
    grad = late.grad
    late.grad = None
    opt = triton_adam.AdamW(params + [late], lr=1e-2, backend="triton", max_grad_norm=1.0)
    opt.step()
    late.grad = grad
    snapshot = _snapshot(opt, params + [late])
    _plant_bf16_compile_failure(monkeypatch)
    with pytest.raises(RuntimeError, match="planted compile failure"):
        opt.step()
    _assert_unchanged(opt, params + [late], snapshot)
    assert opt.state[params[0]]["step"].item() == 1.0


def _key(name, args, kwargs):
    """What selects a compiled kernel on a GPU: constexprs and options, integer arguments, and
    each pointer argument's dtype and 16-byte alignment."""
    described = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            described.append(("ptr", arg.dtype, arg.data_ptr() % 16 == 0))
        elif isinstance(arg, int):
            described.append(("int", arg))
        else:
            described.append(("other", repr(arg)))
    return (name, tuple(described), tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


@pytest.fixture
def recorded(monkeypatch):
    """Every warm-up and launch of the four kernels, as (key) sets."""
    calls = {"warmup": set(), "launch": set()}
    for name, kernel in KERNELS.items():
        original = kernel.run

        def run(*args, grid, warmup, _name=name, _original=original, **kwargs):
            calls["warmup" if warmup else "launch"].add(_key(_name, args, kwargs))
            return _original(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return calls


def _unaligned(grad):
    """The same values at an address 4 bytes past a 16-byte boundary."""
    buffer = torch.empty(grad.numel() + 1, dtype=grad.dtype)
    view = buffer[1:]
    view.copy_(grad)
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("options", [
    dict(), dict(amsgrad=True), dict(max_grad_norm=1.0), dict(skip_nonfinite=True),
    dict(max_grad_norm=0.5, skip_nonfinite=True)], ids=["plain", "amsgrad", "clip", "skip",
                                                         "clip+skip"])
def test_every_launch_was_compiled_when_the_plan_was_built(recorded, options):
    params = _params([torch.float32, torch.bfloat16], numel=5000)
    opt = triton_adam.AdamW(params, lr=1e-2, backend="triton", **options)
    grads = [p.grad.clone() for p in params]
    opt.step()  # builds the plan: every warm-up happens here
    warmed = set(recorded["warmup"])
    assert warmed, "no warm-up when the plan was built"
    # then every AMP mode and unaligned grads, with the same plan (no further warm-up)
    scale = torch.full((), 4.0)
    for grad_scale, found_inf in [(None, torch.zeros(())), (scale, torch.zeros(())),
                                  (None, None)]:
        opt.grad_scale, opt.found_inf = grad_scale, found_inf
        for p, g in zip(params, grads):
            p.grad = g * (4.0 if grad_scale is not None else 1.0)
        opt.step()
    del opt.grad_scale, opt.found_inf
    for p, g in zip(params, grads):
        p.grad = _unaligned(g)
    opt.step()
    assert recorded["warmup"] == warmed, "a later step compiled something"
    launched_kernels = {key[0] for key in recorded["launch"]}
    assert {"coefficients", "step"} <= launched_kernels
    if options.get("max_grad_norm") or options.get("skip_nonfinite"):
        assert {"partials", "finalize"} <= launched_kernels
    missing = recorded["launch"] - warmed
    assert not missing, f"launched without a warm-up at plan build: {missing}"


def test_run_or_compile_loads_what_it_compiles():
    """With warmup the launcher compiles and loads (a kernel too big for the device fails
    there), and never launches."""
    events = []

    class Compiled:
        def _init_handles(self):
            events.append("loaded")

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            events.append(("compiled", args, grid, kwargs))
            return Compiled()

        def __getitem__(self, grid):
            raise AssertionError("a warm-up launched the kernel")

    K.run_or_compile(Kernel(), (3,), True, "table", NUM=1)
    assert events == [("compiled", ("table",), (3,), {"NUM": 1}), "loaded"]


def test_clipping_switched_on_later_is_compiled_before_its_first_launch(recorded, monkeypatch):
    params = _params([torch.float32])
    opt = triton_adam.AdamW(params, lr=1e-2, backend="triton")
    opt.step()
    assert not {key[0] for key in recorded["warmup"]} & {"partials", "finalize"}
    opt.max_grad_norm = 1.0
    # a failing compile of the norm kernels now stops the step before anything is modified
    original = N.grad_norm_partials_kernel.warmup

    def failing(*args, **kwargs):
        raise RuntimeError("planted compile failure")

    monkeypatch.setattr(N.grad_norm_partials_kernel, "warmup", failing)
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="planted compile failure"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    monkeypatch.setattr(N.grad_norm_partials_kernel, "warmup", original)
    opt.step()
    assert {"partials", "finalize"} <= {key[0] for key in recorded["launch"]}
    assert not recorded["launch"] - recorded["warmup"]
