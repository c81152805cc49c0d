"""state_dtype="int8" / "int4" / "fp8": blockwise quantised moments (triton_adam/_quantize.py,
kernels/moment_codes.py) in the one launch."""
import copy
import io

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import triton_adam
from conftest import DEVICE_BACKENDS, DEVICES, backends_on
from interpreter_faults import skip_if_fma_rounds_twice
from triton_adam import _quantize
from triton_adam.kernels import moment_codes

FORMATS = list(_quantize.FORMATS)
BLOCK = _quantize.QUANT_BLOCK  # int8's
# the largest error of one decoded value, relative to its block's scale (of the root, for a
# second moment): half a code step in the square-root domain for the integer maps,
# d(u) = d(sqrt(u)**2) <= 2 * (1/(2L)) + (1/(2L))**2; fp8: half an ulp of e4m3 (1/16 of the
# value), or of its subnormal step 2**-10 / 448 of the scale
ERROR_BOUND = {"int8": 1 / 127 + 1 / (2 * 127) ** 2, "int4": 1 / 7 + 1 / (2 * 7) ** 2}


def fmt_of(name):
    return _quantize.FORMATS[name]


# --- the codes, against a NumPy reference of the same maps ---

def numpy_decoded(u, name, signed):
    """float64 reference: the value each ``u`` in [-1, 1] (of the block's scale) decodes to."""
    if name == "fp8":
        y = np.abs(u) * 448
        quantum = 2.0 ** (np.floor(np.log2(np.maximum(y, 2.0**-6))) - 3)
        decoded = np.round(y / quantum) * quantum / 448  # np.round: half to even, as e4m3
    else:
        fmt = fmt_of(name)
        levels = fmt.signed_levels if signed else fmt.unsigned_levels
        # a second moment's codes are the square root's (u is already the root)
        decoded = (np.floor(levels * np.sqrt(np.abs(u)) + 0.5) / levels) ** 2
    return np.sign(u) * decoded


def block_scales(x, block):
    pad = (-x.size) % block
    blocks = np.abs(np.pad(x, (0, pad)).reshape(-1, block))
    return np.repeat(blocks.max(axis=1), block)[:x.size]


def within_bound(decoded, exact, scale, name):
    if name == "fp8":
        bound = np.maximum(np.abs(exact) / 16, scale * 2.0**-10 / 448)
    else:
        bound = scale * ERROR_BOUND[name]
    return np.all(np.abs(decoded - exact) <= bound * 1.0001)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("numel", [1, 127, 255, 257, 5001])
def test_codes_match_a_numpy_reference_and_stay_within_their_error_bound(name, numel):
    fmt = fmt_of(name)
    rng = np.random.default_rng(numel)
    m = (rng.standard_normal(numel) * np.exp(rng.uniform(-8, 2, numel))).astype(np.float32)
    v = (m.astype(np.float64) ** 2 * rng.uniform(0.5, 2, numel)).astype(np.float32)
    codes_m, scale_m = _quantize.encode_signed(torch.from_numpy(m), fmt)
    codes_v, scale_v = _quantize.encode_unsigned(torch.from_numpy(v), fmt)
    assert codes_m.numel() == _quantize.n_code_elements(numel, fmt)
    assert scale_m.shape == (_quantize.n_blocks(numel, fmt),)
    dm = _quantize.decode_signed(codes_m, scale_m, numel, fmt).numpy().astype(np.float64)
    dv = _quantize.decode_unsigned(codes_v, scale_v, numel, fmt).numpy().astype(np.float64)
    sm = block_scales(m.astype(np.float64), fmt.block)
    root = np.sqrt(v.astype(np.float64))
    sv = block_scales(root, fmt.block)
    np.testing.assert_array_equal(np.repeat(scale_m.numpy(), fmt.block)[:numel], sm)
    ref_m = numpy_decoded(m / sm, name, signed=True) * sm
    ref_root = numpy_decoded(root / sv, name, signed=False) * sv
    ref_root[(root > 0) & (ref_root == 0)] = np.nan  # the never-zero rule, checked below
    # float32 vs float64 arithmetic may land a value on the other side of a half
    agree = np.isclose(dm, ref_m, rtol=1e-6, atol=0)
    assert agree.mean() > 0.99
    assert within_bound(dm, m, sm, name)
    decoded_root = np.sqrt(dv)
    finite = ~np.isnan(ref_root)
    assert np.isclose(decoded_root[finite], ref_root[finite], rtol=1e-6, atol=0).mean() > 0.99
    assert within_bound(decoded_root[finite], root[finite], sv[finite], name)


@triton.jit
def _unit_root_kernel(x_ptr, root_ptr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(root_ptr + offsets, moment_codes._unit_root(tl.load(x_ptr + offsets)))


def _float32_bits(value: float) -> int:
    return np.float32(value).view(np.int32).item()


@pytest.mark.parametrize("device", [
    pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES])
def test_the_codes_branch_free_root_is_the_ieee_root_of_the_float32_it_takes(device):
    """moment_codes._unit_root against the IEEE square root, bit for bit, for what the codes'
    roots take: [2**-100, 2), and 2**-50 below it. On a GPU all 847,249,408 float32 there: the
    check that its MUFU.RSQ sequence is ptxas's sqrt.rn. In the interpreter (40 s for all of
    them, done when the function was written) the two lowest binades, where the residual goes
    subnormal, the two highest, and 2**22 drawn from between: root and residual scale by 2 from
    one pair of binades to the next, so a pair is a period of the arithmetic."""
    if "triton" not in backends_on(device):
        pytest.skip("no Triton on this device here (the interpreter is off)")
    skip_if_fma_rounds_twice(torch.float32)
    floor, top = _float32_bits(2.0**-100), _float32_bits(2.0)
    if device == "cuda":
        spans = [(start, min(start + (1 << 24), top)) for start in range(floor, top, 1 << 24)]
        block = 1024
    else:
        spans = [(floor, _float32_bits(2.0**-98)), (_float32_bits(0.5), top)]
        block = 1 << 20  # the interpreter runs a program at a time: few, large ones
    generator = torch.Generator().manual_seed(20261130)
    batches = [torch.tensor([0.0, 1e-45, 2.0**-126, 2.0**-101, 7.8886e-31])]
    batches += [torch.arange(a, b, dtype=torch.int32).view(torch.float32) for a, b in spans]
    batches.append(torch.randint(floor, top, (1 << 22,), generator=generator,
                                 dtype=torch.int32).view(torch.float32))
    for x in batches:
        x = x.to(device)
        n = x.numel()
        padded = torch.ones(-(-n // block) * block, device=device)
        padded[:n] = x
        root = torch.full_like(padded, float("nan"))  # poisoned: every lane must be written
        _unit_root_kernel[(padded.numel() // block,)](padded, root, BLOCK=block,
                                                      enable_fp_fusion=False)
        # correctly rounded through float64 (torch's vectorised CPU float32 sqrt is not, always)
        expected = torch.clamp(x, min=2.0**-100).double().sqrt().float()
        mismatched = (root[:n].view(torch.int32) != expected.view(torch.int32)).sum().item()
        assert mismatched == 0, f"{mismatched} of {n} roots differ, from {x[0].item()!r}"


@pytest.mark.parametrize("name", FORMATS)
def test_a_nonzero_second_moment_never_decodes_to_zero(name):
    fmt = fmt_of(name)
    v = torch.tensor([1e30] + [1e-30] * 255 + [0.0] * 10, dtype=torch.float32)
    codes, scale = _quantize.encode_unsigned(v, fmt)
    decoded = _quantize.decode_unsigned(codes, scale, v.numel(), fmt)
    assert (decoded[v > 0] > 0).all() and (decoded[v == 0] == 0).all()


def test_int4_codes_pack_two_to_a_byte_low_nibble_first():
    fmt = fmt_of("int4")
    codes, scale = _quantize.encode_signed(torch.tensor([1.0, -1.0, 0.0]), fmt)
    assert codes.dtype == torch.uint8 and codes.tolist() == [0x97, 0x00]  # 7, -7 (0b1001)
    assert _quantize.decode_signed(codes, scale, 3, fmt).tolist() == [1.0, -1.0, 0.0]


# --- the optimizer ---

SHAPES = [(5000,), (64, 70), (4100,), (10,), (0,), ()]


def make_params(dtype, device, seed):
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype).to(device))
              for s in SHAPES]
    params[1] = torch.nn.Parameter(params[1].detach().t())  # permuted strides
    return params, generator


def run(backend, device, dtype=torch.float32, steps=4, seed=0, state_dtype="int8",
        grad_dtype=None, **options):
    params, generator = make_params(dtype, device, seed)
    opt = triton_adam.AdamW(params, lr=1e-2, backend=backend, state_dtype=state_dtype,
                            **options)
    for p in params:
        if grad_dtype is not None:
            p.grad_dtype = None  # torch >= 2.10 checks .grad's dtype against this; None: any
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(grad_dtype or dtype).to(device)
        opt.step()
    return params, opt


def assert_same_state(opt_a, a, opt_b, b):
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), i
        for key, value in opt_a.state[p].items():
            other = opt_b.state[q][key]
            if value.dtype == torch.float8_e4m3fn:
                value, other = value.view(torch.uint8), other.view(torch.uint8)
            if p.numel() < 4096 and "exp_avg_sq" in key and p.numel() % 8:
                # float32 moments there: torch's fused kernel rounds its scalar tail apart
                torch.testing.assert_close(value, other, rtol=1e-6, atol=0)
                continue
            assert torch.equal(value, other), (i, key)


def needs_interpreter():
    if "triton" not in backends_on("cpu"):
        pytest.skip("needs the Triton interpreter")
    skip_if_fma_rounds_twice(torch.float32)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_both_backends_give_the_same_bits(dtype, name):
    """The Triton kernel and the torch fallback quantise alike: the same codes, scales and
    params (partial last blocks, permuted strides, empty and 0-d tensors, small tensors with
    float32 moments in the same launch as quantised ones)."""
    needs_interpreter()
    (a, opt_a), (b, opt_b) = (run(backend, "cpu", dtype, state_dtype=name)
                              for backend in ("triton", "torch"))
    assert_same_state(opt_a, a, opt_b, b)
    fmt = fmt_of(name)
    big, small = opt_a.state[a[0]], opt_a.state[a[3]]
    assert big["exp_avg"].dtype == fmt.signed_dtype
    assert big["exp_avg_sq"].dtype == fmt.unsigned_dtype
    assert big["exp_avg"].numel() == _quantize.n_code_elements(5000, fmt)
    assert big["exp_avg_scale"].shape == (_quantize.n_blocks(5000, fmt),)
    assert small["exp_avg"].dtype == torch.float32 and "exp_avg_scale" not in small
    # one bucket, quantised and float32-moment tensors together
    buckets = opt_a._plan.triton_buckets
    assert len(buckets) == 1 and len(buckets[0].members) == len(SHAPES)


# numels against a quantised program's tile (_tables.ALIGNED_QUANT_TILE_SIZE) and the pieces
# of 256 elements (or one scale block, if larger) its partial last tile goes in: whole tiles,
# one element past, a part of a piece, pieces and a part, odd counts; below a tile too
PARTIAL_TILE_NUMELS = [4096, 2049, 2048 + 200, 2048 + 257, 2048 + 1023, 6143, 1, 3, 255, 513]


@pytest.mark.parametrize("name,options", [
    ("int8", {}), ("int4", {}), ("fp8", {}), ("int8", dict(amsgrad=True)),
    ("int4", dict(quant_block_size=512)), ("fp8", dict(quant_block_size=64, amsgrad=True)),
])
def test_partial_tiles_are_updated_whole_in_pieces(name, options):
    """Every element of a tensor's partial last tile is stepped and encoded, whatever the
    length left (the kernel takes it in masked pieces): both backends give the same bits over
    tensors of every length class, quantised down to one element, in one launch."""
    needs_interpreter()
    runs = []
    for backend in ("triton", "torch"):
        generator = torch.Generator().manual_seed(sum(PARTIAL_TILE_NUMELS))
        params = [torch.nn.Parameter(torch.randn(n, generator=generator))
                  for n in PARTIAL_TILE_NUMELS]
        starts = [p.detach().clone() for p in params]
        opt = triton_adam.AdamW(params, lr=1e-2, backend=backend, state_dtype=name,
                                min_quantized_numel=0, **options)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            opt.step()
        runs.append((params, opt))
    (a, opt_a), (b, opt_b) = runs
    assert_same_state(opt_a, a, opt_b, b)
    assert all("exp_avg_scale" in opt_a.state[p] for p in a)  # every one quantised
    for p, start in zip(a, starts):  # (the last run's starts: the same draws)
        assert (p.detach() != start).all()  # every element stepped


@pytest.mark.parametrize("name,options", [
    ("int8", dict(amsgrad=True)),
    ("int4", dict(amsgrad=True, max_grad_norm=1.0)),
    ("fp8", dict(amsgrad=True, grad_dtype=torch.float32)),
    ("int8", dict(master_weights="compact", grad_dtype=torch.float32)),
    ("int4", dict(master_weights=True)),
    ("fp8", dict(kahan_summation=True)),
    ("int8", dict(stochastic_rounding=True, seed=7)),
])
def test_backends_agree_with_amsgrad_and_the_precision_rungs(name, options):
    needs_interpreter()
    dtype = torch.float32 if options.keys() == {"amsgrad"} else torch.bfloat16
    (a, opt_a), (b, opt_b) = (run(backend, "cpu", dtype, state_dtype=name, **options)
                              for backend in ("triton", "torch"))
    if "max_grad_norm" in options:  # the known ulp of the clip factor between backends
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-2)
        return
    assert_same_state(opt_a, a, opt_b, b)
    if options.get("amsgrad"):
        state = opt_a.state[a[0]]
        assert state["max_exp_avg_sq"].dtype == fmt_of(name).unsigned_dtype
        assert state["max_exp_avg_sq_scale"].shape == state["exp_avg_sq_scale"].shape


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("master", [True, "compact"])
def test_a_bf16_params_master_steps_as_float32_params_do(device, backend, master):
    """int8 moments with a master: the float32 master follows the float32-param run bit for
    bit (same codes), and the bfloat16 param is its rounding."""
    generator = torch.Generator().manual_seed(11)
    start = torch.randn(5000, generator=generator).bfloat16().float()
    p32 = torch.nn.Parameter(start.clone().to(device))
    p16 = torch.nn.Parameter(start.bfloat16().to(device))
    p16.grad_dtype = None  # float32 grads
    opt32 = triton_adam.AdamW([p32], lr=1e-2, backend=backend, state_dtype="int8")
    opt16 = triton_adam.AdamW([p16], lr=1e-2, backend=backend, state_dtype="int8",
                              master_weights=master)
    for _ in range(5):
        g = torch.randn(5000, generator=generator).to(device)
        p32.grad, p16.grad = g.clone(), g.clone()
        opt32.step()
        opt16.step()
    master_param = opt16.state_dict()["state"][0]["master_param"]
    assert torch.equal(master_param, p32.detach())
    for key in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale"):
        assert torch.equal(opt16.state[p16][key], opt32.state[p32][key]), key
    assert (p16.float() - p32).abs().max() <= p32.abs().max() * 2.0**-8


@pytest.mark.parametrize("name,block", [("int8", 64), ("int4", 512), ("fp8", 128)])
def test_block_size_is_a_keyword(name, block):
    """quant_block_size: the scales follow it (both backends, the same bits), a checkpoint
    saved with one block size loads into another (re-quantised as a dense one would be), and
    a size the kernels cannot tile is refused."""
    needs_interpreter()
    (a, opt_a), (b, opt_b) = (run(backend, "cpu", state_dtype=name, quant_block_size=block,
                                  amsgrad=True) for backend in ("triton", "torch"))
    assert_same_state(opt_a, a, opt_b, b)
    assert opt_a.state[a[0]]["exp_avg_scale"].shape == (-(-5000 // block),)
    resumed = []
    for compact in (True, False):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in a]
        opt = triton_adam.AdamW(copies, lr=1e-2, backend="torch", state_dtype=name,
                                amsgrad=True)  # the format's default block size
        opt.load_state_dict(copy.deepcopy(opt_a.state_dict(compact=compact)))
        _continue(copies, opt, seed=2)
        resumed.append((copies, opt))
    (c, opt_c), (d, opt_d) = resumed
    _assert_same_run(c, opt_c, d, opt_d)
    assert opt_c.state[c[0]]["exp_avg_scale"].shape == (
        _quantize.n_blocks(5000, fmt_of(name)),)
    for bad in (96, 1024, True):
        with pytest.raises(ValueError, match="quant_block_size"):
            triton_adam.AdamW(a, state_dtype=name, quant_block_size=bad)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("name,amsgrad", [("int8", True), ("int4", False), ("fp8", True)])
def test_follows_a_float64_reference_that_quantises_the_same_way(device, backend, name,
                                                                  amsgrad):
    """Each step: decode, AdamW in float64, encode with the same codes; the params stay within
    float32 rounding of that reference over 10 steps."""
    fmt = fmt_of(name)
    generator = torch.Generator().manual_seed(3)
    start = torch.randn(5000, generator=generator)
    p = torch.nn.Parameter(start.clone().to(device))
    opt = triton_adam.AdamW([p], lr=1e-2, weight_decay=0.1, backend=backend, state_dtype=name,
                            amsgrad=amsgrad)
    x = start.double()
    zero = torch.zeros(5000)
    m_codes, m_scale = _quantize.encode_signed(zero, fmt)
    v_codes, v_scale = _quantize.encode_unsigned(zero, fmt)
    max_codes, max_scale = v_codes, v_scale
    for t in range(1, 11):
        g = torch.randn(5000, generator=generator)
        p.grad = g.to(device)
        opt.step()
        m = _quantize.decode_signed(m_codes, m_scale, 5000, fmt).double()
        v = _quantize.decode_unsigned(v_codes, v_scale, 5000, fmt).double()
        x = x * (1 - 1e-2 * 0.1)
        m = 0.9 * m + 0.1 * g.double()
        v = 0.999 * v + 0.001 * g.double() ** 2
        second = v
        if amsgrad:
            second = torch.maximum(
                _quantize.decode_unsigned(max_codes, max_scale, 5000, fmt).double(), v)
            max_codes, max_scale = _quantize.encode_unsigned(second.float(), fmt)
        x = x - 1e-2 / (1 - 0.9**t) * m / (second.sqrt() / (1 - 0.999**t) ** 0.5 + 1e-8)
        m_codes, m_scale = _quantize.encode_signed(m.float(), fmt)
        v_codes, v_scale = _quantize.encode_unsigned(v.float(), fmt)
        torch.testing.assert_close(p.detach().cpu().double(), x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_deterministic_and_a_skipped_step_changes_nothing(device, backend):
    (a, _), (b, opt) = (run(backend, device, seed=5, state_dtype="int4") for _ in range(2))
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
@pytest.mark.parametrize("name", FORMATS)
def test_state_dict_is_dense_and_loads_both_ways_with_torch(device, backend, name):
    """state_dict() holds dense float32 moments (the codes decoded), which torch's AdamW
    loads; ours loads them back (quantised again: the same codes), and loads a torch
    checkpoint (quantised on load)."""
    params, opt = run(backend, device, state_dtype=name, steps=2)
    saved = copy.deepcopy(opt.state_dict())
    state = saved["state"][0]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["exp_avg"].dtype == torch.float32
    own = opt.state[params[0]]
    assert torch.equal(state["exp_avg"], _quantize.dense(params[0], own)["exp_avg"])
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch.optim.AdamW(torch_params, lr=1e-2).load_state_dict(copy.deepcopy(saved))
    again = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = triton_adam.AdamW(again, lr=1e-2, backend=backend, state_dtype=name)
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
    opt3 = triton_adam.AdamW(loaded, lr=1e-2, backend=backend, state_dtype=name)
    opt3.load_state_dict(copy.deepcopy(reference.state_dict()))
    for q in loaded:
        q.grad = torch.zeros_like(q)
    opt3.step()
    assert opt3.state[loaded[0]]["exp_avg"].dtype == fmt_of(name).signed_dtype


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


@pytest.mark.parametrize("target", ["fp32-moments", "bf16-moments", "now-small", "relaid",
                                    "int4-relaid", "int4-from-transposed"])
def test_a_compact_checkpoint_in_another_storage_becomes_what_a_dense_one_would(target):
    """Where the param's storage differs (float32 or bfloat16 moments; int8, but the param now
    under min_quantized_numel; int8 codes of a param now laid out otherwise), a compact
    checkpoint is decoded (and re-quantised) at the next step: exactly what loading the dense
    checkpoint of the same state gives."""
    # int4's packed codes carry no layout: a checkpoint holds them row-major, else dense
    int4 = target.startswith("int4")
    params, opt = run("torch", "cpu", state_dtype="int4" if int4 else "int8")
    if target == "int4-from-transposed":  # a row-major param saved, loaded as a transposed one
        params[1] = torch.nn.Parameter(params[1].detach().contiguous())
        opt = triton_adam.AdamW(params, lr=1e-2, backend="torch", state_dtype="int4")
        _continue(params, opt, seed=8)
    options = {"fp32-moments": dict(state_dtype=None),
               "bf16-moments": dict(state_dtype=torch.bfloat16),
               "now-small": dict(state_dtype="int8", min_quantized_numel=10**6),
               "relaid": dict(state_dtype="int8")}.get(target, dict(state_dtype="int4"))
    resumed = []
    for compact in (True, False):
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        if target in ("relaid", "int4-relaid"):
            copies[1] = torch.nn.Parameter(copies[1].detach().contiguous())
        elif target == "int4-from-transposed":
            copies[1] = torch.nn.Parameter(copies[1].detach().t().contiguous().t())
        opt2 = triton_adam.AdamW(copies, lr=1e-2, backend="torch", **options)
        opt2.load_state_dict(copy.deepcopy(opt.state_dict(compact=compact)))
        _continue(copies, opt2, seed=9)
        resumed.append((copies, opt2))
    (a, opt_a), (b, opt_b) = resumed
    _assert_same_run(a, opt_a, b, opt_b)
    held = opt_a.state[a[1]]
    expected = {"fp32-moments": torch.float32, "bf16-moments": torch.bfloat16,
                "now-small": torch.float32, "relaid": torch.int8}.get(target, torch.uint8)
    assert held["exp_avg"].dtype == expected
    assert ("exp_avg_scale" in held) == (target in ("relaid", "int4-relaid",
                                                    "int4-from-transposed"))
    if not int4:
        assert held["exp_avg"].stride() == a[1].stride()


def test_a_refused_step_leaves_loaded_codes_as_they_were():
    """Codes loaded for a param laid out otherwise are re-quantised when the step prepares
    the state, in a new dict stored only once the step goes ahead: a step refused for
    another param leaves them, bit for bit."""
    source = [torch.nn.Parameter(torch.randn(70, 64).t()), torch.nn.Parameter(torch.randn(10))]
    opt = triton_adam.AdamW(source, backend="torch", state_dtype="int8")
    _continue(source, opt, seed=3, steps=1)
    target = [torch.nn.Parameter(source[0].detach().contiguous()),
              torch.nn.Parameter(source[1].detach().clone())]
    opt2 = triton_adam.AdamW(target, backend="torch", state_dtype="int8")
    opt2.load_state_dict(copy.deepcopy(opt.state_dict(compact=True)))
    before = {k: v.clone() for k, v in opt2.state[target[0]].items()}
    for p in target:
        p.grad = torch.randn_like(p)
    opt2.state[target[1]]["exp_avg"] = torch.randn(5)  # a bad state: the step is refused
    with pytest.raises(ValueError, match="param 1 of group 0"):
        opt2.step()
    after = opt2.state[target[0]]
    assert all(torch.equal(after[k], v) and after[k].stride() == v.stride()
               for k, v in before.items())


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("bad", ["overflow", "nan"])
def test_a_non_finite_moment_leaves_its_block_usable_on_both_backends(name, bad):
    """A grad whose square overflows float32 (v = inf) or a NaN grad: its moment is encoded
    as the largest float32 (NaN: 0), so the block's scale stays finite; the backends agree,
    and, as torch.optim.AdamW, only the NaN grad's own param becomes NaN."""
    needs_interpreter()
    runs = []
    for backend in ("triton", "torch"):
        generator = torch.Generator().manual_seed(4)
        p = torch.nn.Parameter(torch.randn(600, generator=generator))
        opt = triton_adam.AdamW([p], lr=1e-2, backend=backend, state_dtype=name,
                                min_quantized_numel=0)
        for step in range(3):
            p.grad = torch.randn(600, generator=generator)
            if step == 0:
                p.grad[5] = 1e21 if bad == "overflow" else float("nan")
            opt.step()
        runs.append((p, opt.state[p]))
    (a, state_a), (b, state_b) = runs
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    for key, value in state_a.items():
        other = state_b[key]
        if value.dtype == torch.float8_e4m3fn:
            value, other = value.view(torch.uint8), other.view(torch.uint8)
        assert torch.equal(value, other), key
    assert all(torch.isfinite(state_a[key]).all() for key in _quantize.SCALE_KEYS
               if key in state_a)
    finite = torch.isfinite(a)
    assert finite.sum() == 600 - (bad == "nan") and (bad == "overflow" or not finite[5])
    dense = _quantize.dense(a, state_a)
    assert torch.isfinite(dense["exp_avg"]).all() and (dense["exp_avg_sq"] > 0).all()
    assert torch.isfinite(dense["exp_avg_sq"]).all()


@pytest.mark.parametrize("name", FORMATS)
def test_the_largest_moments_decode_finite(name):
    """Infinite and float32-max moments are encoded as (the root of) the float32 under the
    largest, whose top code decodes within an ulp of its scale: never to inf."""
    fmt = fmt_of(name)
    largest = torch.finfo(torch.float32).max
    m = torch.tensor([float("inf"), -largest, largest, float("-inf"), 1.0] + [0.5] * 300)
    v = torch.tensor([float("inf"), largest, 1.0] + [0.5] * 300)
    codes, scale = _quantize.encode_signed(m, fmt)
    decoded = _quantize.decode_signed(codes, scale, m.numel(), fmt)
    assert torch.isfinite(decoded).all() and (decoded[:4].abs() > 3.4e38).all()
    assert torch.equal(decoded[:4].sign(), torch.tensor([1.0, -1.0, 1.0, -1.0]))
    codes, scale = _quantize.encode_unsigned(v, fmt)
    decoded = _quantize.decode_unsigned(codes, scale, v.numel(), fmt)
    assert torch.isfinite(decoded).all() and (decoded[:2] > 3.4e38).all()


@pytest.mark.parametrize("name", FORMATS)
def test_moments_below_the_smallest_normal_float32_are_stored_as_zero_on_both_backends(name):
    """exp_avg values under 2**-126 (one block all of them, one mixed with normal ones) are
    stored as 0, so every scale is normal or 0 and its reciprocal finite; the backends agree
    bit for bit and nothing turns NaN."""
    needs_interpreter()
    block = fmt_of(name).block
    runs = []
    for backend in ("triton", "torch"):
        generator = torch.Generator().manual_seed(6)
        p = torch.nn.Parameter(torch.randn(3 * block, generator=generator))
        opt = triton_adam.AdamW([p], lr=1e-2, eps=1e-30, backend=backend, state_dtype=name,
                                min_quantized_numel=0)
        for _ in range(2):
            grad = torch.randn(3 * block, generator=generator)
            grad[:block] *= 1e-37  # m = 0.1 * g: mostly subnormal, some not
            grad[block:2 * block] *= 1e-39  # all subnormal
            p.grad = grad
            opt.step()
        runs.append((p, opt.state[p]))
    (a, state_a), (b, state_b) = runs
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for key, value in state_a.items():
        other = state_b[key]
        if value.dtype == torch.float8_e4m3fn:
            value, other = value.view(torch.uint8), other.view(torch.uint8)
        assert torch.equal(value, other), key
    assert torch.isfinite(a).all()
    scale = state_a["exp_avg_scale"]
    assert scale[1] == 0 and scale[0] >= torch.finfo(torch.float32).tiny
    exp_avg = _quantize.dense(a, state_a)["exp_avg"]
    assert (exp_avg[block:2 * block] == 0).all() and (exp_avg[:block] != 0).any()


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


@pytest.mark.parametrize("dtype,options,ratio", [
    (torch.bfloat16, dict(master_weights="compact"), 0.505),
    (torch.bfloat16, dict(master_weights=True), 0.505),
    (torch.float16, dict(master_weights=True), 0.505),
    (torch.bfloat16, dict(kahan_summation=True), 0.406)], ids=["compact", "master-bf16",
                                                               "master-fp16", "kahan"])
def test_a_compact_checkpoint_with_a_master_is_about_half(dtype, options, ratio):
    """The README's figures: both dicts hold the float32 master (4 bytes a param; Kahan's
    compensation: 2), so compact codes save less of the whole."""
    n = 1 << 16
    p = torch.nn.Parameter(torch.randn(n).to(dtype))
    opt = triton_adam.AdamW([p], state_dtype="int8", backend="torch", **options)
    p.grad = torch.randn_like(p)
    opt.step()
    _, dense = _through_a_file(opt.state_dict())
    _, compact = _through_a_file(opt.state_dict(compact=True))
    assert abs(compact / dense - ratio) < 0.001


@pytest.mark.parametrize("name,per_param", [("int8", 2 + 8 / 256), ("fp8", 2 + 8 / 256),
                                            ("int4", 1 + 8 / 128)])
def test_memory_per_param(name, per_param):
    p = torch.nn.Parameter(torch.randn(1 << 16))
    opt = triton_adam.AdamW([p], state_dtype=name)
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state_bytes() == (1 << 16) * per_param  # int8, fp8: 2.03 B; int4: 1.06 B


@pytest.mark.parametrize("case,error,match", [
    ("a moment of another shape", ValueError, "has shape"),
    ("a moment sharded otherwise", ValueError, "local shard"),
    ("codes sharded otherwise", ValueError, "local shard"),
    ("a scale held as a DTensor", TypeError, "plain tensor"),
])
def test_bad_state_of_a_dtensor_param_is_refused_before_anything_changes(case, error, match):
    """Rank 0 of a 2-rank FSDP2 world on the fake process group (shapes only): loaded dense
    moments are checked before they are quantised into the local shard's blocks, and held
    codes and scales must be this rank's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = torch.nn.Linear(64, 65)
        fully_shard(model)
        weight = model.weight
        mesh = weight.device_mesh
        opt = triton_adam.AdamW(model.parameters(), lr=0.1, state_dtype="int8", backend="torch")
        for q in model.parameters():
            q.grad = torch.ones_like(q)
        opt.step()
        assert opt.state[weight]["exp_avg"].dtype == torch.int8  # 4160 elements, 2112 here
        if "moment" in case:
            saved = opt.state_dict()
            saved["state"][0]["exp_avg"] = torch.zeros(3) if "shape" in case else \
                DTensor.from_local(torch.zeros(5, 64), mesh, weight.placements,
                                   run_check=False, shape=weight.shape, stride=weight.stride())
            opt.load_state_dict(saved)
        elif case.startswith("codes"):
            opt.state[weight]["exp_avg"] = DTensor.from_local(
                torch.zeros(65, 64, dtype=torch.int8), mesh, [Replicate()], run_check=False)
        else:
            opt.state[weight]["exp_avg_scale"] = DTensor.from_local(
                opt.state[weight]["exp_avg_scale"], mesh, [Replicate()], run_check=False)
        held = dict(opt.state[weight])
        values = [q.to_local().clone() for q in model.parameters()]
        with pytest.raises(error, match=match):
            opt.step()
        assert all(torch.equal(q.to_local(), v) for q, v in zip(model.parameters(), values))
        assert all(opt.state[weight][key] is value for key, value in held.items())
        assert float(opt.state[weight]["step"]) == 1.0
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


@pytest.mark.parametrize("options,compact", [
    (dict(state_dtype="int8"), False),
    (dict(state_dtype="int8", master_weights=True), False),
    (dict(state_dtype="int8", kahan_summation=True), False),
    (dict(state_dtype="int8", master_weights="compact"), True),
    (dict(state_dtype=None, master_weights="compact"), False)],
    ids=["int8", "int8-master", "int8-kahan", "int8-compact-master-compact-dict",
         "compact-master"])
@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_a_state_dict_kept_while_training_goes_on_stays_one_snapshot(device, backend, options,
                                                                     compact):
    """Each state of a dict kept while the optimizer steps on is the state of one step: the
    live one's tensors (torch's dict holds the live states) or, where the dict holds it in another form
    (decoded moments, a dense master), a copy of all of it (the live step count beside moments
    of an earlier step was saved as a state that never existed)."""
    dtype = torch.float32 if set(options) == {"state_dtype"} else torch.bfloat16
    params, opt = run(backend, device, steps=2, dtype=dtype, **options)
    held = opt.state_dict(compact=compact)
    then = copy.deepcopy(held)
    _continue(params, opt, seed=5, steps=2)
    copies = 0
    for index, state in then["state"].items():
        live = opt.state[params[index]]
        if all(value is live.get(key) for key, value in held["state"][index].items()):
            continue  # the live state's tensors (in a plain dict: ours count their changes)
        copies += 1
        assert set(held["state"][index]) == set(state)
        for key, value in state.items():
            assert torch.equal(held["state"][index][key], value), (index, key)
    assert copies > 0
