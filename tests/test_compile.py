"""torch.compile: the step is one opaque custom op in the graph, on both backends.

The Triton backend runs here through the interpreter (CPU tensors), the torch fallback through
torch's fused kernels; both are compiled with aot_eager (functionalization: the op runs on copies
that are copied back) and inductor (C++ on the CPU; the op runs on the optimizer's own tensors).
"""
import copy

import pytest
import torch

import triton_adam
from triton_adam import _compile, _plan
from conftest import backends_on

OPT_BACKENDS = backends_on("cpu")
COMPILERS = ["aot_eager", "inductor"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    extra = torch.nn.Parameter(torch.randn(7).to(torch.bfloat16))
    return model, extra


def _groups(model, extra):
    # two groups with their own lr and flags, one of them amsgrad with a bfloat16 param: one
    # op call must still give each tensor its group's hyperparameters
    return [{"params": list(model[0].parameters())},
            {"params": list(model[2].parameters()) + [extra], "lr": 3e-3, "amsgrad": True}]


def _backward(model, extra, seed):
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(seed))
    loss = model(x).square().mean() + extra.float().square().sum()
    loss.backward()
    return loss


def _assert_same(opt_a, opt_b, params_a, params_b, exact=True):
    """Same params and states: bit for bit, or (``exact=False``) to float32 rounding."""
    tolerance = {} if not exact else dict(rtol=0, atol=0)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a.detach(), b.detach(), **tolerance)
        for key, value in opt_a.state[a].items():
            torch.testing.assert_close(value, opt_b.state[b][key], msg=key, **tolerance)


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("options", [{}, {"max_grad_norm": 0.05, "skip_nonfinite": True}],
                         ids=["plain", "clip+skip"])
def test_compiled_step_fullgraph_matches_eager(backend, compiler, options):
    model, extra = _model()
    eager_model, eager_extra = copy.deepcopy(model), copy.deepcopy(extra)
    opt = triton_adam.AdamW(_groups(model, extra), lr=1e-2, backend=backend, **options)
    eager = triton_adam.AdamW(_groups(eager_model, eager_extra), lr=1e-2, backend=backend,
                              **options)
    compiled_step = torch.compile(opt.step, backend=compiler, fullgraph=True)
    params = list(model.parameters()) + [extra]
    eager_params = list(eager_model.parameters()) + [eager_extra]
    with torch._dynamo.config.patch(error_on_recompile=True):  # one graph serves every step
        for step in range(3):
            _backward(model, extra, step)
            _backward(eager_model, eager_extra, step)
            if step == 1 and options.get("skip_nonfinite"):
                extra.grad[0] = eager_extra.grad[0] = float("nan")
            compiled_step()
            eager.step()
            _assert_same(opt, eager, params, eager_params)
            if options:
                torch.testing.assert_close(opt.last_grad_norm, eager.last_grad_norm, rtol=0,
                                           atol=0, equal_nan=True)
                assert opt.last_step_skipped.item() == eager.last_step_skipped.item() == (
                    step == 1)
            opt.zero_grad()
            eager.zero_grad()
    assert opt.state[params[0]]["step"].item() == (2.0 if options else 3.0)


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_compiled_train_step_has_the_step_in_its_graph(backend, compiler):
    """forward, backward, step: dynamo breaks the graph only at ``backward()`` (which it does
    not trace, whatever the optimizer); the step, and what reads the params after it, is one
    graph with one call of the custom op."""
    model, extra = _model()
    eager_model, eager_extra = copy.deepcopy(model), copy.deepcopy(extra)
    opt = triton_adam.AdamW(_groups(model, extra), lr=1e-2, backend=backend)
    eager = triton_adam.AdamW(_groups(eager_model, eager_extra), lr=1e-2, backend=backend)
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.registry.lookup_backend(compiler)(gm, example_inputs)

    def train_step(model, extra, opt, seed):
        loss = _backward(model, extra, seed)
        opt.step()
        # read after the step: must see the updated params (the op names them as mutated).
        # (Not a clone: torch 2.13's inductor returns the input itself for a clone of an input
        # a custom op mutated, which would then follow later steps.)
        return loss, model[0].weight * 2

    compiled = torch.compile(train_step, backend=counting)
    before_step = model[0].weight.detach() * 2
    for step in range(3):
        loss, weight = compiled(model, extra, opt, step)
        eager_loss, eager_weight = train_step(eager_model, eager_extra, eager, step)
        # the compiled forward and backward may round differently from eager ones
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(weight, eager_weight)
        assert not torch.equal(weight, before_step), "read the weight before the step"
        before_step = weight.detach().clone()
        opt.zero_grad()
        eager.zero_grad()
    _assert_same(opt, eager, list(model.parameters()) + [extra],
                 list(eager_model.parameters()) + [eager_extra], exact=False)
    ops = [str(node.target) for gm in graphs for node in gm.graph.nodes
           if node.op == "call_function"]
    assert sum(op.startswith("triton_adam.adam_step") for op in ops) == 1, ops
    explained = torch._dynamo.explain(train_step)(model, extra, opt, 3)
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert reasons and all("backward" in r for r in reasons), reasons


@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_inductor_runs_the_op_on_the_optimizer_tensors_and_keeps_its_plan(backend, monkeypatch):
    """Inductor re-inplaces the op: it gets the optimizer's own params and states, so the plan
    (tables, compiled kernels) is built once, as in eager steps."""
    builds = []
    original = _plan.StepPlan.__init__

    def counting_init(self, *args, **kwargs):
        builds.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(_plan.StepPlan, "__init__", counting_init)
    model, extra = _model()
    opt = triton_adam.AdamW(_groups(model, extra), lr=1e-2, backend=backend)
    compiled_step = torch.compile(opt.step, backend="inductor", fullgraph=True)
    for step in range(3):
        _backward(model, extra, step)
        compiled_step()
    assert len(builds) == 1


def test_dtensor_params_under_compile_fail_clearly(monkeypatch):
    monkeypatch.setattr(_compile, "_is_dtensor", lambda tensor: True)
    model, extra = _model()
    opt = triton_adam.AdamW(_groups(model, extra), backend="torch")
    _backward(model, extra, 0)
    with pytest.raises(Exception, match="DTensor"):
        torch.compile(opt.step, backend="aot_eager", fullgraph=True)()
    assert not opt.state  # refused before any state was created


@pytest.mark.parametrize("states", ["plain", "int8"])
def test_custom_op_passes_opcheck(states):
    """Schema (mutated args: 8-bit codes and their scales too), fake implementation and
    registrations agree with the op."""
    model, extra = _model()
    if states == "int8":  # the weights' moments as codes, the biases' and extra's float32
        opt = triton_adam.AdamW(list(model.parameters()) + [extra], lr=1e-2, backend="torch",
                                state_dtype="int8", min_quantized_numel=15)
    else:
        opt = triton_adam.AdamW(_groups(model, extra), lr=1e-2, backend="torch")
    _backward(model, extra, 0)
    lists = [[] for _ in range(8)]  # params, grads, 4 states, extras, scales
    scale_keys, groups = [], []
    for index, group in enumerate(opt.param_groups):
        before = len(lists[0])
        opt._init_group(group, *lists, scale_keys)
        groups += [index] * (len(lists[0]) - before)
    assert len(lists[-1]) == (4 if states == "int8" else 0)
    indices = list(range(len(lists[0])))
    args = (*lists, [], None, None, groups, indices, scale_keys, opt._compile_handle)
    torch.library.opcheck(torch.ops.triton_adam.adam_step.default, args,
                          test_utils=("test_schema", "test_faketensor"))



@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_lr_changes_are_followed(lr_kind):
    """The op reads hyperparameters when it runs. dynamo guards on a float lr (as for
    torch.optim), so a new value recompiles; a tensor lr changes without recompiling."""
    model, extra = _model()
    eager_model, eager_extra = copy.deepcopy(model), copy.deepcopy(extra)
    opt = triton_adam.AdamW(_groups(model, extra), lr=1e-2, backend="torch")
    eager = triton_adam.AdamW(_groups(eager_model, eager_extra), lr=1e-2, backend="torch")
    lrs = {opt: torch.tensor(1e-2), eager: torch.tensor(1e-2)}
    compiled_step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=lr_kind == "tensor"):
        for step, value in enumerate([1e-2, 4e-3, 1e-3]):
            for optimizer, tensor in lrs.items():
                tensor.fill_(value)
                for group in optimizer.param_groups:
                    group["lr"] = tensor if lr_kind == "tensor" else value
            _backward(model, extra, step)
            _backward(eager_model, eager_extra, step)
            compiled_step()
            eager.step()
            opt.zero_grad()
            eager.zero_grad()
    _assert_same(opt, eager, list(model.parameters()) + [extra],
                 list(eager_model.parameters()) + [eager_extra])


def test_a_dead_optimizer_leaves_no_handle():
    import gc

    model, extra = _model()
    opt = triton_adam.AdamW(_groups(model, extra), backend="torch")
    _backward(model, extra, 0)
    torch.compile(opt.step, backend="aot_eager", fullgraph=True)()
    handle = opt._compile_handle
    assert _compile._optimizer(handle) is opt
    torch._dynamo.reset()  # the compiled code holds the optimizer
    del opt
    gc.collect()
    assert handle not in _compile._OPTIMIZERS


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("rung", [dict(master_weights=True), dict(master_weights="compact"),
                                  dict(kahan_summation=True),
                                  dict(stochastic_rounding=True, seed=5)],
                         ids=["master", "compact", "kahan", "sr"])
def test_precision_rungs_compile_and_match_eager(backend, compiler, rung):
    """Masters, remainders and compensations travel through the op as mutated arguments; the
    stochastic-rounding stream keys (param indices) are the eager step's, so the bits agree."""
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(),
                                    torch.nn.Linear(5, 3)).to(torch.bfloat16)
        return model
    model, eager_model = build(), build()
    model[0].bias.requires_grad_(False)  # a param without a grad shifts the later indices
    eager_model[0].bias.requires_grad_(False)
    opt = triton_adam.AdamW(model.parameters(), lr=1e-2, backend=backend, **rung)
    eager = triton_adam.AdamW(eager_model.parameters(), lr=1e-2, backend=backend, **rung)
    compiled_step = torch.compile(opt.step, backend=compiler, fullgraph=True)
    params = [p for p in model.parameters() if p.requires_grad]
    eager_params = [p for p in eager_model.parameters() if p.requires_grad]
    for step in range(3):
        for m in (model, eager_model):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            m(x.to(torch.bfloat16)).float().square().mean().backward()
        compiled_step()
        eager.step()
        _assert_same(opt, eager, params, eager_params)
    key = {"master_weights": "master_param"}.get(next(iter(rung)))
    if rung.get("master_weights") == "compact":
        key = "master_remainder"
    elif rung.get("kahan_summation"):
        key = "kahan_compensation"
    if key:
        assert all(key in opt.state[p] for p in params)


@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_a_mode_switch_that_rewrites_params_still_adds_amsgrads_state(backend):
    """True -> "compact" at a tie (the param moves to the compact rounding) together with
    amsgrad switched on, under compile: both conversions happen before the graph runs."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = triton_adam.AdamW([p], lr=0.0, weight_decay=0.0, backend=backend, master_weights=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    tie = torch.tensor(1.0 + 2**-8)  # halfway between 1 and the next bfloat16
    opt.state[p]["master_param"].fill_(tie)
    opt.param_groups[0]["master_weights"] = "compact"
    opt.param_groups[0]["amsgrad"] = True
    torch.compile(opt.step, backend="aot_eager", fullgraph=True)()
    assert {"max_exp_avg_sq", "master_remainder"} <= set(opt.state[p])
    assert (p == 1.0 + 2**-7).all()  # the compact rounding of the tie, half away from zero


def _int8_params(seed):
    """Quantised params (a partial last block; permuted strides) beside small ones that keep
    float32 moments, in two groups."""
    generator = torch.Generator().manual_seed(seed)
    big = torch.nn.Parameter(torch.randn(5000, generator=generator))
    permuted = torch.nn.Parameter(torch.randn(64, 70, generator=generator).t())
    small = torch.nn.Parameter(torch.randn(10, generator=generator))
    half = torch.nn.Parameter(torch.randn(4100, generator=generator).to(torch.bfloat16))
    return [big, permuted, small, half]


def _int8_opt(params, backend, **options):
    return triton_adam.AdamW([{"params": params[:3]}, {"params": params[3:], "lr": 3e-3}],
                             lr=1e-2, backend=backend, state_dtype="int8", **options)


def _fresh_grads(params_a, params_b, generator):
    for a, b in zip(params_a, params_b):
        a.grad = torch.randn(a.shape, generator=generator).to(a.dtype)
        b.grad = a.grad.clone()


@pytest.mark.parametrize("compiler", COMPILERS)
@pytest.mark.parametrize("backend", OPT_BACKENDS)
def test_int8_states_compile_and_match_eager(backend, compiler):
    """8-bit codes travel in the moment lists and their block scales as mutated arguments of
    the op: compiled steps give the eager steps' bits (params, codes, scales, the small
    params' float32 moments), step after step, from one graph."""
    params, eager_params = _int8_params(0), _int8_params(0)
    opt, eager = _int8_opt(params, backend), _int8_opt(eager_params, backend)
    compiled_step = torch.compile(opt.step, backend=compiler, fullgraph=True)
    generator = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            _fresh_grads(params, eager_params, generator)
            compiled_step()
            eager.step()
            _assert_same(opt, eager, params, eager_params)
    held = [{key: value.dtype for key, value in opt.state[p].items()} for p in params]
    for state in held[:2] + held[3:]:
        assert state == {"step": torch.float32, "exp_avg": torch.int8,
                         "exp_avg_sq": torch.uint8, "exp_avg_scale": torch.float32,
                         "exp_avg_sq_scale": torch.float32}
    assert held[2]["exp_avg"] == torch.float32 and "exp_avg_scale" not in held[2]
    assert opt.state[params[0]]["step"].item() == 3.0


def _two_compiled_steps_match_eager(opt, eager, params, eager_params, seed):
    compiled_step = torch.compile(opt.step, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(2):
        _fresh_grads(params, eager_params, generator)
        compiled_step()
        eager.step()
        _assert_same(opt, eager, params, eager_params)


@pytest.mark.parametrize("state_dtype", ["int4", "fp8"])
def test_other_formats_amsgrad_and_compact_masters_compile_and_match_eager(state_dtype):
    """int4's packed codes and fp8's, amsgrad's quantised maximum and a bfloat16 group's
    compact master travel through the op like int8's codes: the eager steps' bits."""
    def build(params):
        return triton_adam.AdamW(
            [{"params": params[:3]}, {"params": params[3:], "master_weights": "compact"}],
            lr=1e-2, backend=OPT_BACKENDS[0], state_dtype=state_dtype, amsgrad=True)

    params, eager_params = _int8_params(6), _int8_params(6)
    opt, eager = build(params), build(eager_params)
    _two_compiled_steps_match_eager(opt, eager, params, eager_params, seed=7)
    state = opt.state[params[3]]
    assert "max_exp_avg_sq_scale" in state and "master_remainder" in state


@pytest.mark.parametrize("saved", ["torch", "compact"])
def test_int8_compiled_from_a_loaded_checkpoint_matches_eager(saved):
    """The traced ``init_group`` converts a loaded state as an eager step does: a dense torch
    checkpoint into codes; a compact one saved from params laid out otherwise re-laid (and so
    re-quantised)."""
    source = _int8_params(2)
    if saved == "torch":
        writer = torch.optim.AdamW([{"params": source[:3]}, {"params": source[3:]}], lr=1e-2)
    else:
        source[1] = torch.nn.Parameter(source[1].detach().contiguous())
        writer = _int8_opt(source, "torch")
    _fresh_grads(source, _int8_params(3), torch.Generator().manual_seed(4))
    writer.step()
    checkpoint = writer.state_dict(**({"compact": True} if saved == "compact" else {}))
    params, eager_params = _int8_params(5), _int8_params(5)
    opt, eager = _int8_opt(params, "torch"), _int8_opt(eager_params, "torch")
    opt.load_state_dict(copy.deepcopy(checkpoint))
    eager.load_state_dict(copy.deepcopy(checkpoint))
    _two_compiled_steps_match_eager(opt, eager, params, eager_params, seed=6)
    assert opt.state[params[1]]["exp_avg"].dtype == torch.int8
    assert opt.state[params[1]]["exp_avg"].stride() == params[1].stride()
