"""Every provider the benchmark names, built and stepped for real on a tiny preset on the CPU.

A peer that is not installed is skipped with its name; an installed one must import, build, step
and have its held bytes counted (CI installs the ``peers`` extra, so these run there). A peer
listed in ``REFUSES_CPU`` may refuse the CPU with its own NotImplementedError (skipped with that
message); every other installed peer must run here.
"""
import pytest
import torch

from triton_adam.bench import byte_model, presets, providers

# Peers whose current release refuses CPU tensors, and the words of their refusal.
REFUSES_CPU = {"flashoptim": "requires a CUDA device"}
# Quantised states: codes plus per-block scales, well under fp32 m and v (8 B per param).
QUANTISED = {"torchao-8bit", "torchao-4bit", "torchao-fp8", "bnb-8bit"}
LR, WD = 1e-3, 1e-2

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_params(dtype):
    """smoke-cpu's shapes (0.14M params, 28 tensors): big tensors take the quantised paths,
    biases and norms the small-tensor paths. Params of about 0.01, so that an lr-sized step is
    many bf16 ulps and shows after rounding."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for _, shape in presets.get_preset("smoke-cpu").params():
        p = (0.01 * torch.randn(shape, generator=gen)).to(dtype)
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        params.append(p)
    return params


def _dtype_for(provider):
    return torch.bfloat16 if provider.low_precision_only else torch.float32


@pytest.mark.parametrize("name", providers.provider_names())
def test_every_installed_provider_builds_and_steps_on_cpu(name):
    provider = providers.BY_NAME[name]
    if provider.version() is None:
        pytest.skip(f"{provider.package} is not installed")
    params = _tiny_params(_dtype_for(provider))
    before = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    cfg = providers.OptimConfig(lr=LR, weight_decay=WD)
    try:
        opt = providers.build(name, params, cfg)
        opt.step()
    except NotImplementedError as exc:
        if name in REFUSES_CPU and REFUSES_CPU[name] in str(exc):
            pytest.skip(f"{name} {provider.version()} refuses the CPU: {exc}")
        raise
    assert all(p.grad is g for p, g in zip(params, grads)), f"{name} dropped .grad in its step"
    n = sum(p.numel() for p in params)
    moved = 0
    for p, p0, g in zip(params, before, grads):
        assert torch.isfinite(p).all(), name
        # Adam's first step moves each element by about lr against its grad (plus the decay).
        delta = p.float() - p0.float() * (1 - LR * WD)
        agree = (torch.sign(delta) == -torch.sign(g.float())) | (delta == 0)
        moved += int(agree.sum())
        assert delta.abs().max() < 5 * LR, (name, delta.abs().max())
    assert moved > 0.95 * n, (name, moved, n)
    assert sum(float((p.float() - p0.float()).abs().mean()) for p, p0 in zip(params, before)) > 0
    held = byte_model.held_bytes(opt, params)
    assert held is not None, f"{name}: its state was not found, so the bench cannot count it"
    if name in QUANTISED:
        assert held / n < 4, (name, held / n)
    elif not provider.low_precision_only:
        assert held / n >= 8, (name, held / n)  # fp32 m and v at least


def test_build_refuses_what_a_provider_has_no_row_for():
    params = _tiny_params(torch.float32)[:2]
    with pytest.raises(ValueError, match="AdamW only"):
        providers.build("heavyball", params, providers.OptimConfig(kind="adam"))
    with pytest.raises(ValueError, match="bf16/fp16 params only"):
        providers.build("torchao-bf16-sr", params)
    with pytest.raises(ValueError, match="no amsgrad option"):
        providers.build("optimi", params, providers.OptimConfig(amsgrad=True))
    with pytest.raises(ValueError, match="unknown provider"):
        providers.build("not-a-peer", params)


def test_build_passes_the_config_through():
    params = _tiny_params(torch.float32)[:2]
    cfg = providers.OptimConfig(kind="adam", lr=3e-4, betas=(0.8, 0.95), eps=1e-6,
                                weight_decay=0.1, amsgrad=True)
    opt = providers.build("forloop", params, cfg)
    assert type(opt) is torch.optim.Adam
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["amsgrad"]) == (
        3e-4, (0.8, 0.95), 1e-6, 0.1, True)


def test_held_bytes_walks_nested_state():
    """heavyball keeps each param's state one dict deeper; the count must still find it."""
    p = torch.zeros(10)
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {0: {"exp_avg": torch.zeros(10), "exp_avg_sq": torch.zeros(10),
                        "step": torch.tensor(3)}, "codes": torch.zeros(10, dtype=torch.uint8)}
    assert byte_model.held_bytes(opt, [p]) == 40 + 40 + 10
    p.grad = torch.zeros(10)
    assert byte_model.bytes_from_optimizer_state(opt, [p]) == 2 * 90 + 2 * 40 + 40
