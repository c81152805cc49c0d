"""state_dtype="int8": blockwise 8-bit moments (triton_adam/_quantize.py) in the one launch."""
import copy
import io

import numpy as np
import pytest
import torch

import triton_adam
from conftest import DEVICE_BACKENDS, backends_on
from interpreter_faults import skip_if_fma_rounds_twice
from triton_adam import _quantize

BLOCK = _quantize.QUANT_BLOCK


# --- the codes, against a NumPy reference of the same maps ---

def numpy_codes(m, v):
    """Reference encoders (float64 NumPy, then the same float32 rounding points)."""
    pad = (-m.size) % BLOCK
    mb = np.pad(m, (0, pad)).reshape(-1, BLOCK)
    scale_m = np.abs(mb).max(axis=1, keepdims=True)
    u = np.divide(mb, scale_m, out=np.zeros_like(mb), where=scale_m > 0)
    code_m = np.sign(u) * np.floor(127 * np.sqrt(np.abs(u)) + 0.5)
    s = np.sqrt(np.pad(v, (0, pad)).reshape(-1, BLOCK))
    scale_v = s.max(axis=1, keepdims=True)
    r = np.divide(s, scale_v, out=np.zeros_like(s), where=scale_v > 0)
    code_v = np.floor(255 * np.sqrt(r) + 0.5)
    code_v[(s > 0) & (code_v == 0)] = 1
    return code_m.ravel()[:m.size], code_v.ravel()[:v.size], scale_m.ravel(), scale_v.ravel()


@pytest.mark.parametrize("numel", [1, 255, 256, 257, 5000])
def test_codes_match_a_numpy_reference_and_stay_within_their_error_bound(numel):
    rng = np.random.default_rng(numel)
    m = (rng.standard_normal(numel) * np.exp(rng.uniform(-8, 2, numel))).astype(np.float32)
    v = (m.astype(np.float64) ** 2 * rng.uniform(0.5, 2, numel)).astype(np.float32)
    codes_m, scale_m = _quantize.encode_exp_avg(torch.from_numpy(m))
    codes_v, scale_v = _quantize.encode_exp_avg_sq(torch.from_numpy(v))
    ref_m, ref_v, ref_sm, ref_sv = numpy_codes(m.astype(np.float64), v.astype(np.float64))
    # float32 vs float64 arithmetic may land a code on the other side of a half: at most 1
    assert np.abs(codes_m.numpy().astype(np.int64) - ref_m).max() <= 1
    assert np.mean(codes_m.numpy() == ref_m) > 0.99
    assert np.abs(codes_v.numpy().astype(np.int64) - ref_v).max() <= 1
    np.testing.assert_allclose(scale_m.numpy(), ref_sm, rtol=0, atol=0)
    np.testing.assert_allclose(scale_v.numpy(), ref_sv.astype(np.float32), rtol=1e-7)
    # errors: half a code in the square-root domain, relative to the block's scale
    dm = _quantize.decode_exp_avg(codes_m, scale_m).numpy()
    per_element = np.repeat(scale_m.numpy(), BLOCK)[:numel]
    assert np.all(np.abs(dm - m) <= per_element * (1 / 127 + 1 / 127**2) * 1.0001)
    dv = _quantize.decode_exp_avg_sq(codes_v, scale_v).numpy()
    root_scale = np.repeat(scale_v.numpy(), BLOCK)[:numel]
    assert np.all(np.abs(np.sqrt(dv) - np.sqrt(v)) <= root_scale * (1 / 255 + 1 / 255**2) * 1.0001)


def test_a_nonzero_second_moment_never_decodes_to_zero():
    v = torch.tensor([1e30] + [1e-30] * 255 + [0.0] * 10, dtype=torch.float32)
    codes, scale = _quantize.encode_exp_avg_sq(v)
    decoded = _quantize.decode_exp_avg_sq(codes, scale)
    assert (decoded[v > 0] > 0).all() and (decoded[v == 0] == 0).all()


# --- the optimizer ---

SHAPES = [(5000,), (64, 70), (4100,), (10,), (0,), ()]


def run(backend, device, dtype=torch.float32, steps=4, seed=0, **options):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype).to(device))
              for s in SHAPES]
    params[1] = torch.nn.Parameter(params[1].detach().t())  # permuted strides
    opt = triton_adam.AdamW(params, lr=1e-2, backend=backend, state_dtype="int8", **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype).to(device)
        opt.step()
    return params, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_both_backends_give_the_same_bits(dtype):
    """The Triton kernel and the torch fallback quantise alike: the same codes, scales and
    params (partial last blocks, permuted strides, empty and 0-d tensors, small tensors with
    float32 moments beside 8-bit ones)."""
    if "triton" not in backends_on("cpu"):
        pytest.skip("needs the Triton interpreter")
    skip_if_fma_rounds_twice(torch.float32)
    (a, opt_a), (b, opt_b) = (run(backend, "cpu", dtype) for backend in ("triton", "torch"))
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), i
        for key, value in opt_a.state[p].items():
            other = opt_b.state[q][key]
            if p.numel() < 4096 and key == "exp_avg_sq" and p.numel() % 8:
                # float32 moments there: torch's fused kernel rounds its scalar tail apart
                torch.testing.assert_close(value, other, rtol=1e-6, atol=0)
                continue
            assert torch.equal(value, other), (i, key)
    big, small = opt_a.state[a[0]], opt_a.state[a[3]]
    assert big["exp_avg"].dtype == torch.int8 and big["exp_avg_sq"].dtype == torch.uint8
    assert big["exp_avg_scale"].shape == (_quantize.n_blocks(5000),)
    assert small["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in small


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_follows_a_float64_reference_that_quantises_the_same_way(device, backend):
    """Each step: decode, AdamW in float64, encode with the same codes; the params stay within
    float32 rounding of that reference over 10 steps."""
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(5000, generator=generator)
    p = torch.nn.Parameter(start.clone().to(device))
    opt = triton_adam.AdamW([p], lr=1e-2, weight_decay=0.1, backend=backend, state_dtype="int8")
    x = start.double()
    m_codes, m_scale = _quantize.encode_exp_avg(torch.zeros(5000))
    v_codes, v_scale = _quantize.encode_exp_avg_sq(torch.zeros(5000))
    for t in range(1, 11):
        g = torch.randn(5000, generator=generator)
        p.grad = g.to(device)
        opt.step()
        m = _quantize.decode_exp_avg(m_codes, m_scale).double()
        v = _quantize.decode_exp_avg_sq(v_codes, v_scale).double()
        x = x * (1 - 1e-2 * 0.1)
        m = 0.9 * m + 0.1 * g.double()
        v = 0.999 * v + 0.001 * g.double() ** 2
        x = x - 1e-2 / (1 - 0.9**t) * m / (v.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8)
        m_codes, m_scale = _quantize.encode_exp_avg(m.float())
        v_codes, v_scale = _quantize.encode_exp_avg_sq(v.float())
        torch.testing.assert_close(p.detach().cpu().double(), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_deterministic_and_a_skipped_step_changes_nothing(device, backend):
    (a, _), (b, opt) = (run(backend, device, seed=5) for _ in range(2))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in b}
    values = [p.detach().clone() for p in b]
    opt.found_inf = torch.ones((), device=device)
    for p in b:
        p.grad = torch.randn_like(p)
    opt.step()
    for p, value in zip(b, values):
        assert torch.equal(p, value)
        assert all(torch.equal(v, before[id(p)][k]) for k, v in opt.state[p].items())


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_state_dict_is_dense_and_loads_both_ways_with_torch(device, backend):
    """state_dict() holds dense float32 moments (the codes decoded), which torch's AdamW
    loads; ours loads them back (quantised again: the same codes), and loads a torch
    checkpoint (quantised on load)."""
    params, opt = run(backend, device)
    saved = copy.deepcopy(opt.state_dict())
    state = saved["state"][0]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["exp_avg"].dtype == torch.float32
    own = opt.state[params[0]]
    assert torch.equal(state["exp_avg"], _quantize.decode_exp_avg(own["exp_avg"],
                                                                   own["exp_avg_scale"]))
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch.optim.AdamW(torch_params, lr=1e-2).load_state_dict(copy.deepcopy(saved))
    again = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = triton_adam.AdamW(again, lr=1e-2, backend=backend, state_dtype="int8")
    opt2.load_state_dict(copy.deepcopy(saved))
    for p, q in zip(params, again):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    opt2.step()
    for p, q in zip(params, again):
        assert torch.equal(p, q)
    # a plain torch checkpoint: float32 moments, quantised on load
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.AdamW(plain, lr=1e-2)
    for q in plain:
        q.grad = torch.randn_like(q)
    reference.step()
    loaded = [torch.nn.Parameter(q.detach().clone()) for q in plain]
    opt3 = triton_adam.AdamW(loaded, lr=1e-2, backend=backend, state_dtype="int8")
    opt3.load_state_dict(copy.deepcopy(reference.state_dict()))
    for q in loaded:
        q.grad = torch.zeros_like(q)
    opt3.step()
    assert opt3.state[loaded[0]]["exp_avg"].dtype == torch.int8


def _through_a_file(state_dict):
    """``state_dict`` written by torch.save and read back (weights only) onto the CPU, wherever
    it was saved from: (what was read, the bytes written)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    size = buffer.tell()
    buffer.seek(0)
    return torch.load(buffer, map_location="cpu", weights_only=True), size


def _continue(params, opt, seed, steps=2):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype).to(p.device)
        opt.step()


def _assert_same_run(params_a, opt_a, params_b, opt_b):
    for i, (p, q) in enumerate(zip(params_a, params_b)):
        assert torch.equal(p, q), i
        assert opt_a.state[p].keys() == opt_b.state[q].keys(), i
        for key, value in opt_a.state[p].items():
            other = opt_b.state[q][key]
            assert value.dtype == other.dtype and torch.equal(value, other), (i, key)


@pytest.mark.parametrize("compact,dtype", [(True, torch.float32), (True, torch.bfloat16),
                                           (False, torch.bfloat16)],
                         ids=["compact-fp32", "compact-bf16", "dense-bf16"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_a_checkpoint_through_a_file_continues_bit_identically(device, backend, compact, dtype):
    """A run resumed from a checkpoint (torch.save, torch.load onto the CPU, loaded into the
    device's params) gives the uninterrupted run's bits. A compact one holds the live codes and scales under the live
    keys, and loading keeps their dtypes (torch's loader would turn codes into floats and
    round a bfloat16 param's scales); a dense one's float32 moments quantise to the same
    codes again."""
    params, opt = run(backend, device, dtype)
    saved = opt.state_dict(compact=compact)
    for index, p in enumerate(params):
        live, written = opt.state[p], saved["state"][index]
        if compact:
            assert written.keys() == live.keys()
            assert all(torch.equal(written[k], v) and written[k].dtype == v.dtype
                       for k, v in live.items())
        else:
            assert written.keys() == {"step", "exp_avg", "exp_avg_sq"}
            assert written["exp_avg"].dtype == torch.float32
    loaded, _ = _through_a_file(saved)
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = triton_adam.AdamW(resumed, lr=1e-2, backend=backend, state_dtype="int8")
    opt2.load_state_dict(loaded)
    if compact:  # as saved before any step converts anything
        _assert_same_run(params, opt, resumed, opt2)
    _continue(params, opt, seed=7)
    _continue(resumed, opt2, seed=7)
    _assert_same_run(params, opt, resumed, opt2)
    assert opt2.state[resumed[0]]["exp_avg_scale"].dtype == torch.float32


@pytest.mark.parametrize("target", ["fp32-moments", "bf16-moments", "now-small", "relaid"])
def test_a_compact_checkpoint_in_another_storage_becomes_what_a_dense_one_would(target):
    """Where the param's storage differs (float32 or bfloat16 moments; int8, but the param now
    under min_quantized_numel; int8 codes of a param now laid out otherwise), a compact
    checkpoint is decoded (and re-quantised) at the next step: exactly what loading the dense
    checkpoint of the same state gives."""
    params, opt = run("torch", "cpu")
    options = {"fp32-moments": dict(state_dtype=None),
               "bf16-moments": dict(state_dtype=torch.bfloat16),
               "now-small": dict(state_dtype="int8", min_quantized_numel=10**6),
               "relaid": dict(state_dtype="int8")}[target]
    resumed = []
    for compact in (True, False):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        if target == "relaid":
            copies[1] = torch.nn.Parameter(copies[1].detach().contiguous())
        opt2 = triton_adam.AdamW(copies, lr=1e-2, backend="torch", **options)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict(compact=compact)))
        _continue(copies, opt2, seed=9)
        resumed.append((copies, opt2))
    (a, opt_a), (b, opt_b) = resumed
    _assert_same_run(a, opt_a, b, opt_b)
    held = opt_a.state[a[1]]
    expected = {"fp32-moments": torch.float32, "bf16-moments": torch.bfloat16,
                "now-small": torch.float32, "relaid": torch.int8}[target]
    assert held["exp_avg"].dtype == expected
    assert ("exp_avg_scale" in held) == (target == "relaid")
    assert held["exp_avg"].stride() == a[1].stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_torch_checkpoint_quantises_to_its_own_moments(dtype):
    """torch.optim.AdamW's moments, saved from a param laid out otherwise (the codes follow
    the new param's memory order), are quantised at the first step: what the step decodes and
    updates is torch's moments, to the codes' error."""
    generator = torch.Generator().manual_seed(11)
    source = torch.nn.Parameter(torch.randn(64, 70, generator=generator).t().to(dtype))
    reference = torch.optim.AdamW([source], lr=1e-2)
    source.grad = torch.randn(source.shape, generator=generator).to(dtype)
    reference.step()
    m0, v0 = (reference.state[source][k].float() for k in ("exp_avg", "exp_avg_sq"))
    p = torch.nn.Parameter(source.detach().contiguous())
    opt = triton_adam.AdamW([p], lr=1e-2, backend="torch", state_dtype="int8")
    opt.load_state_dict(copy.deepcopy(reference.state_dict()))
    p.grad = torch.randn(p.shape, generator=generator).to(dtype)
    opt.step()
    g = p.grad.float()
    held = opt.state_dict()["state"][0]
    m, v = 0.9 * m0 + 0.1 * g, 0.999 * v0 + 0.001 * g * g
    # two quantisations (on load, after the update), each within a code of the block's scale
    torch.testing.assert_close(held["exp_avg"], m, rtol=0, atol=float(m.abs().max()) * 2 / 127)
    torch.testing.assert_close(held["exp_avg_sq"].sqrt(), v.sqrt(), rtol=0,
                               atol=float(v.sqrt().max()) * 3 / 255)


def test_a_compact_checkpoint_is_about_a_quarter_of_the_dense_one():
    n = 1 << 16
    p = torch.nn.Parameter(torch.randn(n))
    opt = triton_adam.AdamW([p], state_dtype="int8", backend="torch")
    p.grad = torch.randn_like(p)
    opt.step()
    _, dense = _through_a_file(opt.state_dict())
    _, compact = _through_a_file(opt.state_dict(compact=True))
    held = 2 * n + 2 * 4 * (n // BLOCK)  # codes, scales
    assert 8 * n <= dense <= 8 * n + 4096  # + the container's few kB
    assert held <= compact <= held + 4096
    assert 0.25 < compact / dense < 0.26


def test_memory_is_about_two_bytes_per_param():
    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = triton_adam.AdamW([p], state_dtype="int8")
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state_bytes() == (1 << 16) * 2 + 2 * 4 * ((1 << 16) // BLOCK)  # 2.03 B/param


@pytest.mark.parametrize("options,error,match", [
    (dict(amsgrad=True), ValueError, "amsgrad"),
    (dict(master_weights=True), ValueError, "master"),
])
def test_what_is_not_built_is_refused_before_anything_changes(options, error, match):
    p = torch.nn.Parameter(torch.ones(5000, dtype=torch.bfloat16))
    opt = triton_adam.AdamW([p], state_dtype="int8", **options)
    p.grad = torch.ones_like(p)
    with pytest.raises(error, match=match):
        opt.step()
    assert torch.equal(p, torch.ones_like(p)) and not opt.state


def test_for_dtensor_params_int8_is_refused_clearly():
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = torch.nn.Linear(100, 100)
        fully_shard(model)
        opt = triton_adam.AdamW(model.parameters(), state_dtype="int8", backend="torch")
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        with pytest.raises(NotImplementedError, match="DTensor"):
            opt.step()
        assert not opt.state
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("compact,state_dtype", [(True, None), (True, "int8"), (False, "int8")],
                         ids=["compact-to-dense", "compact-to-int8", "dense-to-int8"])
def test_a_checkpoint_of_another_param_is_refused_naming_it(compact, state_dtype):
    """Decoding or quantising a loaded state that does not fit its param fails with the
    param's name, before anything changes."""
    p = torch.nn.Parameter(torch.randn(5000))
    writer = triton_adam.AdamW([p], state_dtype="int8", backend="torch")
    p.grad = torch.randn_like(p)
    writer.step()
    q = torch.nn.Parameter(torch.randn(4500))
    opt = triton_adam.AdamW([q], state_dtype=state_dtype, backend="torch")
    opt.load_state_dict(copy.deepcopy(writer.state_dict(compact=compact)))
    loaded = dict(opt.state[q])
    q.grad = torch.randn_like(q)
    before = q.detach().clone()
    with pytest.raises((ValueError, TypeError), match=r"param 0 of group 0 \(shape \(4500,\)"):
        opt.step()
    assert torch.equal(q, before)
    assert all(opt.state[q][key] is value for key, value in loaded.items())
