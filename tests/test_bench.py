"""Tests of the benchmark suite's pieces: presets, byte model, timing, runner, report, parity."""
import importlib.metadata
import json

import pytest
import torch

from triton_adam.bench import byte_model, kernel_report, parity, presets, providers, report, runner, timing



# Timing values are not asserted; one thread keeps these tests quick on a busy 2-core box.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ------------------------------------------------------------------ presets
@pytest.mark.parametrize(
    "name, expected",
    [
        ("gpt2-124m", 124_439_808),  # tied lm_head, wpe 1024x768, biases and LayerNorms included
        ("llama-3.2-1b", 1_235_814_400),
        ("llama-3.1-8b", 8_030_261_248),
        ("vit-b16", 86_567_656),  # timm vit_base_patch16_224
    ],
)
def test_preset_parameter_counts_match_real_models(name, expected):
    assert presets.total_params(presets.get_preset(name).params()) == expected


def test_preset_names_are_unique_per_preset():
    for name in presets.preset_names():
        names = [n for n, _ in presets.get_preset(name).params()]
        assert len(names) == len(set(names)), name


def test_many_small_is_deterministic_and_in_range():
    a = presets.get_preset("many-small").params()
    assert a == presets.get_preset("many-small").params()
    assert len(a) == 4096
    sizes = [presets.numel(s) for _, s in a]
    assert min(sizes) >= 1024 and max(sizes) <= 16384
    assert len(set(sizes)) > 100  # really varied, not one repeated shape


def test_one_huge_exceeds_int32_and_is_gpu_only():
    p = presets.get_preset("one-huge")
    assert p.gpu_only
    assert presets.total_params(p.params()) > 2**31


def test_default_preset_per_device():
    assert presets.default_preset("cuda") == "llama-3.2-1b"
    cpu = presets.default_preset("cpu")
    assert not presets.get_preset(cpu).gpu_only
    assert presets.total_params(presets.get_preset(cpu).params()) < 20_000_000


def test_auto_device_follows_cuda_availability():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert runner.resolve_device("auto").type == expected
    assert runner.resolve_device("cpu").type == "cpu"


def test_unknown_preset_lists_choices():
    with pytest.raises(KeyError, match="gpt2-124m"):
        presets.get_preset("gpt-5")


# ------------------------------------------------------------------ byte model
def test_byte_model_hand_counts():
    f32, bf16 = torch.float32, torch.bfloat16
    # two params of 3 and 5 elements
    assert byte_model.adam_step_bytes([3, 5], f32) == 224  # 28 B/elem
    assert byte_model.adam_step_bytes([3, 5], f32, amsgrad=True) == 288  # 36 B/elem
    assert byte_model.adam_step_bytes([3, 5], bf16) == 112  # 14 B/elem, bf16 states
    assert byte_model.adam_bytes_per_element(bf16, bf16, f32) == 22  # fp32 states
    assert byte_model.adam_bytes_per_element(torch.float16) == 14


def test_clip_byte_model_hand_counts():
    f32, bf16 = torch.float32, torch.bfloat16
    n = [3, 5]  # 8 elements
    # torch: step 28 + norm read 4 + scale read/write 8 = 40 B/elem; fused: 28 + norm read 4.
    assert byte_model.adam_step_bytes(n, f32) + byte_model.clip_bytes(n, f32, fused=False) == 320
    assert byte_model.adam_step_bytes(n, f32) + byte_model.clip_bytes(n, f32, fused=True) == 256
    # bf16 grads: 2 B per pass; step 14 B/elem.
    assert byte_model.adam_bytes_per_element(bf16) + byte_model.clip_bytes_per_element(bf16, False) == 20
    assert byte_model.adam_bytes_per_element(bf16) + byte_model.clip_bytes_per_element(bf16, True) == 16
    # The clip passes are over the grads: fp32 grads of bf16 params count 4 B per pass.
    assert byte_model.clip_bytes_per_element(f32, fused=False) == 12


@pytest.mark.parametrize("amsgrad, expected", [(False, 224), (True, 288)])
def test_bytes_from_optimizer_state_matches_model_for_torch(amsgrad, expected):
    params = [torch.randn(3, requires_grad=True), torch.randn(5, requires_grad=True)]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, amsgrad=amsgrad, foreach=False)
    opt.step()
    assert byte_model.bytes_from_optimizer_state(opt, params) == expected


def test_bytes_from_optimizer_state_is_none_without_state():
    params = [torch.randn(3, requires_grad=True)]
    params[0].grad = torch.randn(3)
    opt = torch.optim.AdamW(params)  # never stepped: no state to count
    assert byte_model.bytes_from_optimizer_state(opt, params) is None


# ------------------------------------------------------------------ timing
def test_time_steps_counts_calls_and_refreshes():
    calls = {"step": 0, "before": 0}

    def step():
        calls["step"] += 1

    def before():
        calls["before"] += 1

    t = timing.time_steps(step, torch.device("cpu"), warmup=2, repeats=5, before_each=before)
    assert calls == {"step": 7, "before": 7}
    assert t.repeats == 5 and t.min_ms <= t.median_ms <= t.max_ms
    assert t.peak_extra_bytes is None  # not measurable on CPU: reported as n/a


def test_copy_bandwidth_counts_read_and_write():
    bw = timing.measure_copy_bandwidth(torch.device("cpu"), 4 * 2**20, repeats=3)
    assert bw.nbytes == 4 * 2**20
    assert bw.gbps == pytest.approx(2 * bw.nbytes / (bw.median_ms * 1e-3) / 1e9)


# ------------------------------------------------------------------ runner
def _quick_cfg(**kw):
    base = dict(device="cpu", presets=["smoke-cpu"], providers=["forloop", "fused"],
                warmup=1, repeats=2, quick=True)
    base.update(kw)
    return runner.BenchConfig(**base)


@pytest.fixture
def small_copy(monkeypatch):
    # Keep runner tests fast: the copy size matters for accuracy, not for the schema.
    monkeypatch.setattr(timing, "default_copy_bytes", lambda device: 8 * 2**20)


def _fake_provider(monkeypatch, name, load):
    """Register, for one test, a provider whose library loader is ``load``."""
    fake = providers.Provider(name, "fake", load, "not-a-package")
    monkeypatch.setattr(providers, "PROVIDERS", providers.PROVIDERS + [fake])
    monkeypatch.setitem(providers.BY_NAME, name, fake)


def test_run_bench_record_schema_and_bytes(small_copy):
    record = runner.run_bench(_quick_cfg())
    assert report.validate_record(record) == []
    json.dumps(record)  # JSON-serialisable as is
    n = presets.total_params(presets.get_preset("smoke-cpu").params())
    rows = {r["provider"]: r for r in record["results"]}
    assert set(rows) == {"forloop", "fused"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["bytes_per_step"] == 28 * n
        assert r["gbps"] == pytest.approx(28 * n / (r["median_ms"] * 1e-3) / 1e9)
        assert r["peak_extra_bytes"] is None
    assert rows["fused"]["speedup_vs_fused"] == pytest.approx(1.0)
    assert record["presets"]["smoke-cpu"]["num_params"] == n
    assert record["copy_bandwidth"]["gbps"] > 0
    assert record["interrupted"] is False


def test_run_bench_bf16_amsgrad_bytes(small_copy):
    record = runner.run_bench(_quick_cfg(dtypes=["bf16"], providers=["forloop"],
                                         optim=providers.OptimConfig(amsgrad=True)))
    (row,) = record["results"]
    n = record["presets"]["smoke-cpu"]["num_params"]
    assert row["status"] == "ok", row
    assert row["bytes_per_step"] == 2 * 9 * n  # bf16 p, g and three bf16 states: 18 B/elem


def test_unavailable_provider_is_listed_with_reason(small_copy, monkeypatch):
    def broken(cfg):
        raise ImportError("No module named 'not_a_lib'")

    _fake_provider(monkeypatch, "fake", broken)
    record = runner.run_bench(_quick_cfg(providers=["fake"]))
    (row,) = record["results"]
    assert row["status"] == "skipped"
    assert "not_a_lib" in row["reason"]
    assert report.validate_record(record) == []


def test_failing_provider_is_an_error_row(small_copy, monkeypatch):
    def load(cfg):
        def make(params, c):
            raise RuntimeError("kernel exploded")
        return make

    _fake_provider(monkeypatch, "boom", load)
    record = runner.run_bench(_quick_cfg(providers=["boom", "fused"]))
    rows = {r["provider"]: r for r in record["results"]}
    assert rows["boom"]["status"] == "error" and "kernel exploded" in rows["boom"]["reason"]
    assert rows["fused"]["status"] == "ok"


def test_gpu_only_preset_is_skipped_on_cpu(small_copy):
    record = runner.run_bench(_quick_cfg(presets=["one-huge"], providers=["fused"]))
    (row,) = record["results"]
    assert row["status"] == "skipped" and "GPU-only" in row["reason"]


def test_ctrl_c_keeps_partial_results(small_copy, monkeypatch):
    real = timing.time_steps
    calls = {"n": 0}

    def interrupt_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # 1: copy bandwidth, 2: forloop, 3: fused
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(timing, "time_steps", interrupt_second)
    record = runner.run_bench(_quick_cfg())
    assert record["interrupted"] is True
    assert [r["provider"] for r in record["results"]] == ["forloop"]
    assert record["results"][0]["status"] == "ok"


def test_busy_cpu_is_flagged(monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (7.5, 5.0, 3.0))
    (warning,) = runner._load_warnings(torch.device("cpu"))
    assert "7.5" in warning
    monkeypatch.setattr(runner.os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert runner._load_warnings(torch.device("cpu")) == []


def test_run_bench_with_clip_counts_clip_bytes_and_records_it(small_copy):
    record = runner.run_bench(_quick_cfg(providers=["triton-adam", "forloop", "fused"],
                                         optim=providers.OptimConfig(max_grad_norm=1.0)))
    assert report.validate_record(record) == []
    assert record["config"]["clip"] is True and record["config"]["max_grad_norm"] == 1.0
    assert "clip_grad_norm_" in record["byte_model"]["clip_note"]
    n = record["presets"]["smoke-cpu"]["num_params"]
    rows = {r["provider"]: r for r in record["results"]}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["grad_norm"] > runner.CLIP_MARGIN * 1.0  # the clip really scales the grads
    assert rows["triton-adam"]["clip"] == "fused"
    assert rows["triton-adam"]["bytes_per_step"] == 32 * n  # 28 + one norm read of the grads
    for name in ("forloop", "fused"):
        assert rows[name]["clip"] == "clip_grad_norm_"
        assert rows[name]["bytes_per_step"] == 40 * n  # 28 + norm read + scale read/write
    assert rows["fused"]["speedup_vs_fused"] == pytest.approx(1.0)


def test_run_bench_without_clip_records_clip_off(small_copy):
    record = runner.run_bench(_quick_cfg(providers=["fused"]))
    assert record["config"]["clip"] is False and record["config"]["max_grad_norm"] is None
    assert record["byte_model"]["clip_note"] is None
    (row,) = record["results"]
    assert row["clip"] is None and row["grad_norm"] is None


def test_every_timed_clip_sees_the_full_norm(small_copy, monkeypatch):
    """torch's clip rewrites the grads; the runner restores them before each step, so every
    step clips a norm above the max norm instead of re-clipping already clipped grads."""
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *a, **kw):
        seen.append(float(real(params, max_norm, *a, **kw)))
        return seen[-1]

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    record = runner.run_bench(_quick_cfg(providers=["forloop"],
                                         optim=providers.OptimConfig(max_grad_norm=2.0)))
    (row,) = record["results"]
    assert len(seen) == 1 + 2  # warm-up + timed steps, each clipped once
    assert seen == pytest.approx([row["grad_norm"]] * 3, rel=1e-5)
    assert min(seen) > runner.CLIP_MARGIN * 2.0


def test_triton_adam_clips_inside_its_step(monkeypatch):
    """No torch clip before the fused step (that would count the clip twice); torch
    providers get exactly one clip_grad_norm_ before their step."""
    calls = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda p, m: calls.append(m))
    params = [torch.randn(4)]
    params[0].grad = torch.randn(4)
    cfg = providers.OptimConfig(max_grad_norm=0.5)
    opt = torch.optim.AdamW(params)
    assert providers.make_step(providers.BY_NAME["triton-adam"], opt, params, cfg) == opt.step
    providers.make_step(providers.BY_NAME["fused"], opt, params, cfg)()
    assert calls == [0.5] and opt.state[params[0]]["step"] == 1
    assert providers.make_step(providers.BY_NAME["fused"], opt, params,
                               providers.OptimConfig()) == opt.step


def test_clip_setup_scales_small_grads_up_and_restores_them():
    params = [torch.full((3,), 1e-3), torch.full((5,), -2e-3)]
    for p in params:
        p.grad = p.clone()
    restore, norm = runner._clip_setup(params, max_norm=10.0)
    assert norm == pytest.approx(runner.CLIP_MARGIN * 10.0, rel=1e-5)
    before = [p.grad.clone() for p in params]
    torch.nn.utils.clip_grad_norm_(params, 10.0)
    assert runner._global_grad_norm(params) == pytest.approx(10.0, rel=1e-4)
    restore()
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert runner._clip_setup(params, None) == (None, None)


def test_clip_too_large_for_fp16_is_an_error_row(small_copy):
    record = runner.run_bench(_quick_cfg(dtypes=["fp16"], providers=["forloop"],
                                         optim=providers.OptimConfig(max_grad_norm=1e9)))
    (row,) = record["results"]
    assert row["status"] == "error" and "overflows" in row["reason"]


def test_clip_title_and_fallback_note():
    assert report.clip_title({"clip": False, "max_grad_norm": None}) == ""
    assert report.clip_title({}) == ""  # records from before the option
    assert "max_norm=1.5" in report.clip_title({"clip": True, "max_grad_norm": 1.5})
    row = {"bytes_per_step": 10, "bytes_source": "model", "clip": "fused"}
    assert "not fused" in report.row_note(dict(row, step_backend="torch"))
    assert report.row_note(dict(row, step_backend="triton")) == ""


def test_unknown_provider_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="unknown provider"):
        providers.select(["forloop", "nope"])
    with pytest.raises(ValueError, match="unknown dtype"):
        runner.run_bench(_quick_cfg(dtypes=["fp8"]))


def test_unavailable_providers_declare_why():
    """Only API facts are declared; no peer is assumed CUDA-only (a refusal is the peer's own)."""
    cfg = providers.OptimConfig()
    for p in providers.PROVIDERS:
        assert p.unsupported_reason(cfg, torch.float16) is None, p.name
    h = providers.BY_NAME["heavyball"]
    assert h.unsupported_reason(providers.OptimConfig(kind="adam")) == "AdamW only"
    assert providers.BY_NAME["optimi"].unsupported_reason(providers.OptimConfig(amsgrad=True)) == (
        "no amsgrad option")
    assert "bf16/fp16" in providers.BY_NAME["optimi-kahan"].unsupported_reason(cfg, torch.float32)


def test_peer_refusing_the_device_is_skipped_with_its_own_message(small_copy, monkeypatch):
    def make(params, cfg):
        raise NotImplementedError("Quantization requires a CUDA device.")

    _fake_provider(monkeypatch, "refuser", lambda cfg: make)
    record = runner.run_bench(_quick_cfg(providers=["refuser"]))
    (row,) = record["results"]
    assert row["status"] == "skipped"
    assert row["reason"] == "NotImplementedError: Quantization requires a CUDA device."
    assert row["version"] is None  # "not-a-package" is not installed


def test_optimizer_dropping_grads_is_an_error_row(small_copy, monkeypatch):
    """An optimizer that sets .grad to None would be timed doing nothing after its first step."""
    class Consuming(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None

    _fake_provider(monkeypatch, "consumer", lambda cfg: lambda params, c: Consuming(params, lr=0.1))
    record = runner.run_bench(_quick_cfg(providers=["consumer"]))
    (row,) = record["results"]
    assert row["status"] == "error" and ".grad to None" in row["reason"]


def test_rows_carry_versions_held_bytes_and_ratio_to_ours(small_copy):
    record = runner.run_bench(_quick_cfg(providers=["triton-adam", "forloop", "fused"],
                                         dtypes=["fp32", "bf16"]))
    assert report.validate_record(record) == []
    rows = {(r["provider"], r["dtype"]): r for r in record["results"]}
    # the installed distribution's version (a CUDA build's torch.__version__ adds "+cu130")
    assert rows[("fused", "fp32")]["version"] == importlib.metadata.version("torch")
    for (name, dtype), r in rows.items():
        assert r["status"] == "ok", r
        # torch and triton-adam keep m and v in the param dtype: 8 B per param fp32, 4 B bf16.
        assert r["held_bytes_per_param"] == (8 if dtype == "fp32" else 4), r
    for dtype in ("fp32", "bf16"):
        ours, fused = rows[("triton-adam", dtype)], rows[("fused", dtype)]
        assert ours["speedup_vs_triton_adam"] == pytest.approx(1.0)
        assert fused["speedup_vs_triton_adam"] == pytest.approx(
            ours["median_ms"] / fused["median_ms"])


# ------------------------------------------------------------------ report
def test_validate_record_catches_missing_fields(small_copy):
    record = runner.run_bench(_quick_cfg(providers=["fused"]))
    del record["results"][0]["gbps"]
    del record["run"]["git_commit"]
    problems = report.validate_record(record)
    assert any("gbps" in p for p in problems) and any("git_commit" in p for p in problems)


def test_plot_and_json_written(tmp_path, small_copy):
    record = runner.run_bench(_quick_cfg())
    png = report.write_plot(record, tmp_path / "sub" / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = report.write_json(record, tmp_path / "r.json")
    assert json.loads(out.read_text())["results"] == record["results"]
    name = report.default_json_path(record, "cpu-box").name
    assert name.startswith("cpu-box-") and name.endswith(".json") and ":" not in name


# ------------------------------------------------------------------ parity
def test_parity_of_torch_against_itself_is_exact():
    make = lambda params, **kw: torch.optim.AdamW(params, foreach=False, **kw)  # noqa: E731
    results = parity.run_parity(make, torch.device("cpu"), steps=3)
    assert [r.dtype for r in results] == ["fp32", "bf16", "fp16"]
    for r in results:
        assert r.max_abs == 0.0 and r.max_rel == 0.0 and r.within_tolerance


def test_parity_detects_a_wrong_optimizer():
    # lr twice too large: the check must fail, or it checks nothing.
    make = lambda params, lr, weight_decay: torch.optim.AdamW(params, lr=2 * lr, weight_decay=weight_decay)  # noqa: E731
    results = parity.run_parity(make, torch.device("cpu"), dtypes=["fp32"], steps=2)
    assert not results[0].within_tolerance and results[0].max_abs > 1e-3


# ------------------------------------------------------------------ kernels table
FAKE_KERNELS = [
    {"name": "adam_fp32", "spec": {"IS_ADAMW": True, "AMSGRAD": False, "BLOCK": 4096},
     "registers": 40, "shared_bytes": 0, "spill_bytes": 0, "ld_vector_width": 4,
     "st_vector_width": 4, "ptx_bytes": 20480},
    {"name": "adam_bf16_amsgrad", "spec": {"IS_ADAMW": True, "AMSGRAD": True},
     "registers": 64, "shared_bytes": 128, "spill_bytes": 16, "ld_vector_width": 1,
     "st_vector_width": 2, "ptx_bytes": 30000},
]


def test_kernels_table_formats_contract_rows():
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(kernel_report.kernels_table(FAKE_KERNELS, "sm_90"))
    text = console.export_text()
    assert "adam_fp32" in text and "adam_bf16_amsgrad" in text and "sm_90" in text
    assert "IS_ADAMW BLOCK=4096" in text
    assert "20.0" in text  # PTX KiB


def test_kernels_table_rejects_rows_breaking_the_contract():
    bad = [dict(FAKE_KERNELS[0])]
    del bad[0]["spill_bytes"]
    with pytest.raises(ValueError, match="spill_bytes"):
        kernel_report.kernels_table(bad, "sm_90")


def test_parity_errors_flag_nan_instead_of_hiding_it():
    ref = [torch.tensor([1.0, 2.0])]
    got = [torch.tensor([1.0, float("nan")])]
    max_abs, max_rel, ok = parity._max_errors(got, ref, 1e-6, 1e-5)
    assert max_abs == float("inf") and not ok


def test_update_error_is_relative_to_the_movement_and_flags_nan():
    init = [torch.zeros(4)]
    want = [torch.full((4,), 2.0)]
    assert parity.update_error([torch.full((4,), 2.2)], want, init) == pytest.approx(0.1)
    assert parity.update_error([torch.full((4,), float("nan"))], want, init) == float("inf")


def test_state_dtype_changes_triton_adams_states_and_bytes(small_copy):
    """--state-dtype bf16: triton-adam holds bfloat16 moments for float32 params (20 B/elem
    moved, 4 B/param held); torch fused keeps float32 ones (28, 8)."""
    record = runner.run_bench(_quick_cfg(providers=["triton-adam", "fused"],
                                         optim=providers.OptimConfig(state_dtype="bf16")))
    n = record["presets"]["smoke-cpu"]["num_params"]
    rows = {r["provider"]: r for r in record["results"]}
    assert rows["triton-adam"]["status"] == "ok", rows["triton-adam"]
    assert rows["triton-adam"]["bytes_per_step"] == 20 * n
    assert rows["triton-adam"]["held_bytes"] == 4 * n
    assert rows["fused"]["bytes_per_step"] == 28 * n
    assert rows["fused"]["held_bytes"] == 8 * n


@pytest.mark.parametrize("options,moved,held", [
    (dict(master_weights="true"), 30, 12), (dict(master_weights="compact"), 26, 10),
    (dict(master_weights="compact", state_dtype="bf16"), 18, 6),
    (dict(kahan_summation=True), 18, 6), (dict(stochastic_rounding=True), 14, 4)])
def test_precision_options_change_triton_adams_bytes(small_copy, options, moved, held):
    """--master-weights / --kahan / --stochastic-rounding: triton-adam's bf16 row counts the
    master, remainder or compensation (bytes moved and held per param); its fp32 row is
    skipped with the reason; torch fused is unchanged."""
    record = runner.run_bench(_quick_cfg(providers=["triton-adam", "fused"], dtypes=["fp32", "bf16"],
                                         optim=providers.OptimConfig(**options)))
    n = record["presets"]["smoke-cpu"]["num_params"]
    rows = {(r["provider"], r["dtype"]): r for r in record["results"]}
    ours = rows[("triton-adam", "bf16")]
    assert ours["status"] == "ok", ours
    assert ours["bytes_per_step"] == moved * n and ours["held_bytes"] == held * n
    assert rows[("triton-adam", "fp32")]["status"] == "skipped"
    assert "bf16/fp16 params only" in rows[("triton-adam", "fp32")]["reason"]
    assert rows[("fused", "bf16")]["bytes_per_step"] == 14 * n


def test_kernel_spec_names_the_master_mode():
    spec = {"PARAM_DTYPE": "bf16", "AMSGRAD": False, "MASTER": 2, "STOCHASTIC_ROUNDING": False}
    assert kernel_report.format_spec(spec) == "PARAM_DTYPE=bf16 MASTER=remainder"
    assert kernel_report.format_spec(dict(spec, MASTER=0, STOCHASTIC_ROUNDING=True)) == \
        "PARAM_DTYPE=bf16 STOCHASTIC_ROUNDING"


class FakeGpu:
    """A CUDA stream and host clock in simulated milliseconds, for ``time_steps(clock=...)``:
    the host advances by the Python work it does; each kernel starts when the GPU is free and
    the host has queued it; an event completes when the GPU reaches it."""

    CYCLES_PER_MS = 1000.0

    def __init__(self):
        self.host = 0.0  # the host's clock
        self.gpu_free = 0.0  # when the GPU has finished everything queued so far

    def launch(self, kernel_ms: float, python_ms: float = 0.0) -> None:
        self.host += python_ms
        self.gpu_free = max(self.gpu_free, self.host) + kernel_ms

    def event(self):
        gpu = self

        class Event:
            def record(self):
                gpu.gpu_free = max(gpu.gpu_free, gpu.host)
                self.at = gpu.gpu_free

            def query(self):
                return self.at <= gpu.host

            def elapsed_time(self, end):
                return end.at - self.at

        return Event()

    def sleep(self, cycles):
        self.launch(cycles / self.CYCLES_PER_MS)

    def synchronize(self):
        self.host = max(self.host, self.gpu_free)

    def now_ms(self):
        return self.host


def test_device_time_leaves_out_the_launch_gaps_of_a_host_bound_step():
    """3 kernels of 1 ms, each after 2 ms of Python: the idle GPU waits for the host (step time
    7 ms, as the events around the step see it), while the kernels take 3 ms (device time, the
    host ahead behind a GPU-side sleep) and step() 6 ms of host time."""
    gpu = FakeGpu()

    def step():
        for _ in range(3):
            gpu.launch(kernel_ms=1.0, python_ms=2.0)

    t = timing.time_steps(step, torch.device("cpu"), warmup=1, repeats=4, clock=gpu)
    assert t.median_ms == pytest.approx(7.0)
    assert t.device_median_ms == pytest.approx(3.0) and t.device_min_ms == pytest.approx(3.0)
    assert t.host_median_ms == pytest.approx(6.0)
    assert t.host_ahead == 1.0


def test_a_step_that_synchronises_is_flagged_not_ahead():
    """A step that waits for the GPU inside (a norm read on the host) cannot get ahead of it:
    every repeat says so, and the sleep stays bounded."""
    gpu = FakeGpu()

    def step():
        gpu.launch(kernel_ms=1.0, python_ms=0.5)
        gpu.synchronize()
        gpu.launch(kernel_ms=1.0, python_ms=0.5)

    t = timing.time_steps(step, torch.device("cpu"), warmup=1, repeats=6, clock=gpu)
    assert t.host_ahead == 0.0
    assert t.device_median_ms >= 2.0
    assert gpu.host < 6 * 2 * timing.MAX_SLEEP_MS + 100  # the doubling stops at the cap


def test_cpu_timing_gives_equal_step_device_and_host_times():
    t = timing.time_steps(lambda: None, torch.device("cpu"), warmup=1, repeats=3)
    assert t.median_ms == t.device_median_ms == t.host_median_ms and t.host_ahead is None


def test_table_and_report_show_device_and_host_times(small_copy, capsys, tmp_path):
    from triton_adam import cli

    record = runner.run_bench(_quick_cfg(providers=["fused"]))
    (row,) = record["results"]
    assert row["device_ms"] == row["median_ms"] == row["host_ms"] and row["host_ahead"] is None
    row.update(device_ms=1.25, host_ms=2.5, host_ahead=0.5)
    report.print_results(record)
    text = capsys.readouterr().out
    assert "device ms" in text and "1.250*" in text and "2.500" in text
    path = tmp_path / "r.json"
    report.write_json(record, path)
    assert cli.main(["report", str(path)]) == 0
    text = capsys.readouterr().out
    assert "device ms" in text and "1.250*" in text and "2.500" in text


def test_host_bench_rows_time_the_stubbed_step_and_torch_fused():
    """bench --host: each row in a process of its own (the stub and the interpreter flag stay
    there), thread CPU time per tensor for the first step and the steady ones."""
    from triton_adam.bench.host import TORCH_FUSED, HostBenchConfig, _measure_apart

    config = HostBenchConfig(tensors=64, warmup=1, repeats=20)
    ours = _measure_apart(config, "fused clip", timeout_s=300)
    backward = _measure_apart(config, "backward grads", timeout_s=300)
    theirs = _measure_apart(config, "backward grads", timeout_s=300, torch_fused=True)
    assert ours["provider"] == "triton-adam (launches stubbed)" and ours["mode"] == "fused clip"
    assert backward["provider"] == ours["provider"]
    assert theirs["provider"] == TORCH_FUSED and theirs["mode"] == "backward grads"
    for row in (ours, backward, theirs):
        assert 0 < row["us_per_tensor"] < row["first_us_per_tensor"] * 50
        assert row["wall_us_per_tensor"] > 0


def test_host_bench_run_takes_each_rows_median_and_compares_like_with_like(monkeypatch):
    """bench --host's record: a row's figure is the median of its processes' medians, run in
    rounds over every row; each row is compared with torch fused given the same grads and
    with torch fused given the same kind of grads (clip, skip and lean make fresh ones)."""
    from triton_adam.bench import host

    base = {"same grads": 1.0, "fresh grads": 2.0, "backward grads": 4.0, "fused clip": 2.5,
            "skip_nonfinite": 2.2, "lean": 3.0}
    order = []

    def fake(config, mode, timeout_s, torch_fused=False):
        order.append((mode, torch_fused))
        value = base[mode] * (10.0 if torch_fused else 1.0) * (1.0, 1.5, 0.9)[
            sum(1 for job in order if job == (mode, torch_fused)) - 1]
        provider = host.TORCH_FUSED if torch_fused else "ours"
        return {"provider": provider, "mode": mode, "first_us_per_tensor": 100.0 * value,
                "us_per_tensor": value, "wall_us_per_tensor": value}

    monkeypatch.setattr(host, "_measure_apart", fake)
    record = host.run(host.HostBenchConfig(rounds=3))
    jobs = len(host.MODES) + len(host.TORCH_MODES)
    assert len(order) == 3 * jobs and order[:jobs] == order[jobs:2 * jobs]  # rounds
    rows = {(r["provider"], r["mode"]): r for r in record["results"]}
    clip = rows["ours", "fused clip"]
    assert clip["us_per_tensor"] == pytest.approx(2.5)  # median of 2.5, 3.75, 2.25
    assert clip["us_per_tensor_per_process"] == pytest.approx([2.5, 3.75, 2.25])
    assert clip["torch_fused_over_this"] == pytest.approx(10.0 / 2.5)
    assert clip["like_for_like_torch_fused_over_this"] == pytest.approx(20.0 / 2.5)
    backward = rows["ours", "backward grads"]
    assert backward["like_for_like_torch_fused_over_this"] == pytest.approx(10.0)
    assert rows[host.TORCH_FUSED, "fresh grads"]["like_for_like_torch_fused_over_this"] == 1.0
