"""Experiment 5: the precision ladder. What bfloat16 training loses in the optimizer, and which
rung gets it back.

Two models, the same data order and the same initial weights (rounded to bfloat16 for every
run, so the fp32 run starts where the bf16 runs start): the char-level GPT of ``char_lm`` and
the digits MLP. Each is trained with float32 AdamW (torch fused, the reference), then with
bfloat16 params under pure bf16 AdamW and each triton-adam rung (master weights as a float32 copy
or as a 2-byte remainder, Kahan compensation, stochastic rounding, bf16 moments), and with the
peers' low-precision AdamW where they run here (torchao's bf16 stochastic rounding, optimi's
Kahan summation). The learning rate decays (cosine, to a tenth) so that late updates fall under
half a bfloat16 ulp of most weights, which pure bf16 then loses.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch.nn import functional as F

from ..bench import byte_model, memory_table
from .char_lm import CharData, CharGPT, GPTConfig, corpus
from .data import load, minibatches
from .models import mlp
from .plotting import plt, save
from .report import Section, fmt, table

LR = 1e-3
WEIGHT_DECAY = 0.01
BATCH = 32
WARMUP = 20


def _ours(**options):
    def make(params):
        import triton_adam
        return triton_adam.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **options)
    return make


def _peer(name):
    def make(params):
        from ..bench import providers
        cfg = providers.OptimConfig(lr=LR, weight_decay=WEIGHT_DECAY)
        return providers.build(name, params, cfg)
    return make


# (label, param dtype, factory, triton-adam options or None for a peer/torch)
RUNS = [
    ("fp32 AdamW (torch fused)", torch.float32,
     lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)),
    ("fp32 params, bf16 states", torch.float32, _ours(state_dtype=torch.bfloat16)),
    ("fp32 params, int8 states", torch.float32, _ours(state_dtype="int8")),
    ("fp32 params, fp8 states", torch.float32, _ours(state_dtype="fp8")),
    ("fp32 params, int4 states", torch.float32, _ours(state_dtype="int4")),
    ("pure bf16", torch.bfloat16, _ours()),
    ("bf16 + master (fp32 copy)", torch.bfloat16, _ours(master_weights=True)),
    ("bf16 + master (compact)", torch.bfloat16, _ours(master_weights="compact")),
    ("bf16 + compact, bf16 states", torch.bfloat16,
     _ours(master_weights="compact", state_dtype=torch.bfloat16)),
    ("bf16 + compact, int8 states", torch.bfloat16,
     _ours(master_weights="compact", state_dtype="int8")),
    ("bf16 + Kahan", torch.bfloat16, _ours(kahan_summation=True)),
    ("bf16 + stochastic rounding", torch.bfloat16, _ours(stochastic_rounding=True, seed=0)),
    ("torchao _AdamW bf16 SR (peer)", torch.bfloat16, _peer("torchao-bf16-sr")),
    ("optimi AdamW Kahan (peer)", torch.bfloat16, _peer("optimi-kahan")),
    ("torchao AdamW8bit (peer)", torch.float32, _peer("torchao-8bit")),
    ("bitsandbytes AdamW8bit (peer)", torch.float32, _peer("bnb-8bit")),
    ("torchao AdamWFp8 (peer)", torch.float32, _peer("torchao-fp8")),
    ("torchao AdamW4bit (peer)", torch.float32, _peer("torchao-4bit")),
]
REFERENCE, PURE = RUNS[0][0], "pure bf16"


def _schedule(optimizer, steps):
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    def factor(step):
        progress = min(step, steps) / steps
        return min(1.0, (step + 1) / WARMUP) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _same_start(model, dtype):
    """The model with its initial weights rounded to bfloat16, held in ``dtype``."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model.to(dtype)


def _train(model, make, batches, steps, loss_of):
    """``steps`` AdamW steps over ``batches`` with the optimizer ``make`` builds; the training
    losses, the optimizer's held state bytes and the parameter count."""
    params = list(model.parameters())
    opt = make(params)
    scheduler = _schedule(opt, steps)
    losses = []
    for batch in batches:
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        scheduler.step()
        losses.append(loss.item())
    return losses, byte_model.held_bytes(opt, params), sum(p.numel() for p in params)


def _lm_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())


def _train_lm(make, dtype, steps, data, config, device):
    model = _same_start(CharGPT(config, seed=0), dtype).to(device)
    generator = torch.Generator().manual_seed(0)
    batches = (tuple(t.to(device) for t in data.batch("train", BATCH, generator))
               for _ in range(steps))
    losses, held, n = _train(model, make, batches, steps, _lm_loss)
    with torch.no_grad():
        x, y = data.batch("val", 256, torch.Generator().manual_seed(1))
        val = _lm_loss(model, (x.to(device), y.to(device))).item()
    return losses, val, held, n


def _train_mlp(make, dtype, epochs, data, device, hidden):
    model = _same_start(mlp(hidden, seed=0), dtype).to(device)
    generator = torch.Generator().manual_seed(0)
    n = len(data.y_train)
    batches = ((data.x_train[idx].to(dtype), data.y_train[idx])
               for _ in range(epochs) for idx in minibatches(n, 128, generator))
    losses, held, n_params = _train(model, make, batches, epochs * math.ceil(n / 128),
                                    lambda m, b: F.cross_entropy(m(b[0]).float(), b[1]))
    with torch.no_grad():
        val = F.cross_entropy(model(data.x_test.to(dtype)).float(), data.y_test).item()
    return losses, val, held, n_params


def _tail(losses, n=20):
    return float(np.mean(losses[-n:]))


def _smooth(losses, window=10):
    values = np.asarray(losses, dtype=np.float64)
    if len(values) < window:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def run(out_dir: str, quick: bool, tracker, device: str, threads: int) -> Section:
    """Train both models with every run, plot the curves, tabulate final losses and memory."""
    t0 = time.perf_counter()
    # quick: small models and few steps (the test suite runs it through Triton's interpreter)
    lm_steps = 12 if quick else 400
    mlp_epochs = 1 if quick else 12
    hidden = [64] if quick else [256, 256]
    text = corpus(20_000 if quick else 120_000)
    lm_data = CharData(text, context=32 if quick else 64)
    config = (GPTConfig(vocab_size=lm_data.vocab_size, context=32, d_model=32, n_layers=1,
                        n_heads=2) if quick else GPTConfig(vocab_size=lm_data.vocab_size))
    digits = load(seed=0).to(device)
    advance = tracker.task("5 precision", total=2 * len(RUNS))

    results = {"lm": {}, "mlp": {}}
    failures = []
    for label, dtype, make in RUNS:
        for task in ("lm", "mlp"):
            try:
                if task == "lm":
                    results[task][label] = _train_lm(make, dtype, lm_steps, lm_data, config,
                                                     device)
                else:
                    results[task][label] = _train_mlp(make, dtype, mlp_epochs, digits, device,
                                                      hidden)
            except Exception as exc:  # a peer not installed, or not running on this device
                failures.append((label, task, f"{type(exc).__name__}: {str(exc)[:160]}"))
            advance()

    titles = {"lm": f"char-level GPT ({lm_steps} steps, batch {BATCH}x64 chars)",
              "mlp": f"digits MLP {'-'.join(map(str, [64, *hidden, 10]))} ({mlp_epochs} epochs)"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = plt.get_cmap("tab10")
    window = 3 if quick else 10
    for ax, task in zip(axes, ("lm", "mlp")):
        for i, (label, _, _) in enumerate(RUNS):
            if label in results[task]:
                style = "--" if "peer" in label else "-"
                ax.plot(_smooth(results[task][label][0], window), style, color=cmap(i % 10),
                        label=label, linewidth=2.2 if label in (REFERENCE, PURE) else 1.2)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss ({window}-step moving mean)")
        ax.set_title(titles[task], fontsize=10)
    axes[0].legend(fontsize=7)
    fig_name = save(fig, out_dir, "precision.png")

    rows = []
    for label, dtype, _ in RUNS:
        cells = [label, "fp32" if dtype == torch.float32 else "bf16"]
        for task in ("lm", "mlp"):
            outcome = results[task].get(label)
            if outcome is None:
                cells += ["n/a", "n/a", "n/a"]
                continue
            losses, val, held, n = outcome
            reference = _tail(results[task][REFERENCE][0]) if REFERENCE in results[task] else None
            gap = (f"{100 * (_tail(losses) / reference - 1):+.1f}%"
                   if reference else "n/a")
            cells += [fmt(_tail(losses)), gap, fmt(val)]
        held = results["lm"].get(label, results["mlp"].get(label, (None, None, None, None)))
        cells.append(f"{held[2] / held[3]:.2f}" if held[2] is not None else "n/a")
        rows.append(cells)

    # the verdict: pure bf16 lags float32 AdamW (by more than 5%), and every rung removes at
    # least 90% of that gap (a single seed: stochastic rounding's own noise is in its number)
    def gap(task, label):
        if label not in results[task] or REFERENCE not in results[task]:
            return math.nan
        return _tail(results[task][label][0]) / _tail(results[task][REFERENCE][0]) - 1
    rungs = [label for label, dtype, _ in RUNS if label.startswith("bf16 +")]
    pure_gap = gap("lm", PURE)
    rung_gaps = {label: gap("lm", label) for label in rungs}
    stalls = pure_gap > 0.05
    recovered = all(abs(g) <= 0.1 * pure_gap for g in rung_gaps.values())
    verdict = ("check passed" if stalls and recovered else "check failed")
    if quick:  # a few steps at warm-up's learning rates: nothing has had time to stall
        verdict = "not evaluated (quick run)"
    summary = (f"char-LM final loss vs fp32 AdamW: pure bf16 {100 * pure_gap:+.1f}%; "
               + ", ".join(f"{label} {100 * g:+.1f}%" for label, g in rung_gaps.items()))

    body = [
        "bfloat16 keeps 8 significant bits: an AdamW update (about lr per step) smaller than half "
        "the spacing of a weight's bfloat16 neighbours is rounded away. Here every run starts from "
        "the same weights (rounded to bfloat16) and sees the same batches; the learning rate warms "
        f"up over {WARMUP} steps to {LR:g} and decays (cosine) to a tenth, weight decay "
        f"{WEIGHT_DECAY:g}. The char-level GPT ({config.n_layers} layers, d={config.d_model}, "
        f"{config.n_heads} heads, context {config.context}, vocabulary {config.vocab_size}) trains "
        "on sentences of a seeded grammar (no download); the MLP on digits. On this CPU "
        "triton-adam runs its torch fallback, which computes what the Triton kernels compute "
        "(same roundings, same random stream; the tests check it).",
        "",
        table(("Run", "params", "LM final loss", "vs fp32", "LM val loss", "MLP final loss",
               "vs fp32", "MLP test loss", "held B/param"), rows),
        "",
        "Final loss = mean training loss of the last 20 steps; held B/param = the optimizer's "
        "state bytes (moments, master, remainder, compensation) per parameter, measured on the "
        "real state tensors.",
        "",
        f"![Training loss per run]({fig_name})",
        "",
        "Bytes per parameter of each mode (byte model, checked against the real state tensors "
        "by `tests/test_memory_table.py`), and the peers' documented figures:",
        "",
        memory_table.markdown(),
        "",
    ]
    def gaps(label):
        return f"{100 * gap('lm', label):+.2f}% (LM), {100 * gap('mlp', label):+.2f}% (MLP)"
    body += ["Quantised moments, final loss against float32 AdamW's (issue target for int8: "
             "within 1% on the char-level GPT): "
             f"`state_dtype=\"int8\"` (2.03 B of state per quantised param) "
             f"{gaps('fp32 params, int8 states')}, torchao AdamW8bit "
             f"{gaps('torchao AdamW8bit (peer)')}, bitsandbytes AdamW8bit "
             f"{gaps('bitsandbytes AdamW8bit (peer)')}; `\"fp8\"` (2.03 B) "
             f"{gaps('fp32 params, fp8 states')}, torchao AdamWFp8 "
             f"{gaps('torchao AdamWFp8 (peer)')}; `\"int4\"` (1.06 B) "
             f"{gaps('fp32 params, int4 states')}, torchao AdamW4bit "
             f"{gaps('torchao AdamW4bit (peer)')}; bf16 params with a compact master and int8 "
             f"moments (4.03 B) {gaps('bf16 + compact, int8 states')}.", ""]
    if failures:
        body += ["Runs that could not run here:", ""]
        body += [f"- {label} on the {task}: {why}" for label, task, why in failures]
        body.append("")
    body += ["**Finding** (criterion: pure bf16 more than 5% above float32 AdamW's final "
             "loss on the char-level GPT, and every triton-adam rung within a tenth of that "
             "gap): " + (
        "pure bf16 AdamW stalls (its final loss is " + f"{100 * pure_gap:+.1f}% off float32 "
        "AdamW's) while the master weights (both forms), the bf16-moment compact mode, Kahan "
        "summation and stochastic rounding recover at least 90% of the gap: " + summary + "."
        if stalls and recovered else "the pattern did not show in this run: " + summary + ".")]
    return Section("Precision ladder (bf16 params)", "\n".join(body), [fig_name], verdict,
                   summary, time.perf_counter() - t0)
