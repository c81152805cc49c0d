"""Tests of the benchmark suite's pieces: presets, byte model, timing, runner, report, parity."""
import json

import pytest
import torch

from triton_adam.bench import byte_model, kernel_report, parity, presets, providers, report, runner, timing



@pytest.fixture(autouse=True)
def one_thread():
    # Timing values are not asserted; one thread keeps these tests quick on a busy 2-core box,
    # where OpenMP barriers with descheduled threads stretch a 2 ms step to hundreds of ms.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

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

    fake = providers.Provider("fake", "fake lib", broken)
    monkeypatch.setattr(providers, "PROVIDERS", providers.PROVIDERS + [fake])
    monkeypatch.setitem(providers.BY_NAME, "fake", fake)
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

    fake = providers.Provider("boom", "fails at construction", load)
    monkeypatch.setattr(providers, "PROVIDERS", providers.PROVIDERS + [fake])
    monkeypatch.setitem(providers.BY_NAME, "boom", fake)
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


def test_unknown_provider_and_dtype_are_rejected():
    with pytest.raises(ValueError, match="unknown provider"):
        providers.select(["forloop", "nope"])
    with pytest.raises(ValueError, match="unknown dtype"):
        runner.run_bench(_quick_cfg(dtypes=["fp8"]))


def test_unavailable_providers_declare_why(monkeypatch):
    p = providers.BY_NAME["apex"]
    assert p.unsupported_reason(torch.device("cpu"), providers.OptimConfig()) == "needs a CUDA device"
    h = providers.BY_NAME["heavyball"]
    assert h.unsupported_reason(torch.device("cpu"), providers.OptimConfig(kind="adam")) == "AdamW only"


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
