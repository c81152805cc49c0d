"""Experiment 4: Adam with and without bias correction (Adam paper, section 6.4).

The paper trains a VAE with beta2 in {0.99, 0.999, 0.9999}, with and without
the bias-correction terms, over a range of step sizes, and finds that without
correction a beta2 close to 1 makes early training unstable at large step
sizes: the second-moment estimate starts near zero, so the first updates are
far larger than the step size. Here: a digits MLP, early training (a few
epochs), the same beta2 grid, with and without correction.
"""
from __future__ import annotations

import math
import time

import numpy as np

from .data import load
from .models import mlp
from .optimizers import make_adam, supports, triton_adam_module
from .plotting import plt, save
from .reference_adam import ReferenceAdam
from .report import Section, fmt, table
from .training import train

BETA2S = (0.99, 0.999, 0.9999)
BETA1 = 0.9
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
HIGH_LR = 1e-2
HIDDEN = [256]
BATCH = 64
SMOOTH = 10


def _optimizer(params, lr: float, beta2: float, bias_correction: bool):
    """Same implementation for both arms, so only the correction differs."""
    ta = triton_adam_module()
    if ta is not None and supports(ta.Adam, "bias_correction"):
        return make_adam(params, lr=lr, betas=(BETA1, beta2), bias_correction=bias_correction)
    return (ReferenceAdam(params, lr=lr, betas=(BETA1, beta2), bias_correction=bias_correction),
            "ReferenceAdam (experiments/reference_adam.py)")


def _label(beta2: float, bc: bool) -> str:
    return f"beta2={beta2:g}, {'with' if bc else 'without'} correction"


def run(out_dir: str, quick: bool, tracker, device: str, threads: int) -> Section:
    """Run experiment 4 and return its report section."""
    t0 = time.perf_counter()
    data = load(seed=0).to(device)
    epochs = 2 if quick else 10
    seeds = [0] if quick else [0, 1, 2]
    lrs = [1e-3, HIGH_LR] if quick else LRS
    configs = [(b2, bc) for b2 in BETA2S for bc in (True, False)]
    advance = tracker.task("4 bias correction", total=len(configs) * len(lrs) * len(seeds))

    final = {}   # (beta2, bc, lr) -> mean final-epoch loss
    curves = {}  # (beta2, bc) -> mean per-step loss at HIGH_LR
    first = {}   # (beta2, bc) -> mean first-epoch loss at HIGH_LR
    peak = {}    # (beta2, bc) -> largest step loss after step 10 at HIGH_LR (spikes)
    impl = ""
    for b2, bc in configs:
        for lr in lrs:
            runs = []
            for seed in seeds:
                model = mlp(HIDDEN, seed=seed).to(device)
                opt, impl = _optimizer(model.parameters(), lr, b2, bc)
                runs.append(train(model, opt, data, epochs=epochs, batch_size=BATCH, seed=seed))
                advance()
            # A diverged run keeps its NaN so the table says "diverged" rather
            # than showing a made-up number.
            final[(b2, bc, lr)] = float(np.mean([r.final_epoch_loss for r in runs]))
            if lr == HIGH_LR:
                n = min(len(r.step_loss) for r in runs)
                curves[(b2, bc)] = np.mean([r.step_loss[:n] for r in runs], axis=0)
                first[(b2, bc)] = float(np.mean([r.epoch_loss[0] for r in runs]))
                peak[(b2, bc)] = float(np.max(curves[(b2, bc)][10:])) if n > 10 else math.nan

    # ---- figure: curves at the high lr, and final loss vs lr (the paper's Fig. 4 layout)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = dict(zip(BETA2S, ("tab:blue", "tab:orange", "tab:red")))
    for b2, bc in configs:
        style = dict(color=colors[b2], ls="-" if bc else "--", lw=1.4)
        # Minibatch losses jump by orders of magnitude from batch to batch once
        # the model fits; a short moving average keeps the curves readable.
        c = curves[(b2, bc)]
        w = min(SMOOTH, len(c))
        smooth = np.convolve(c, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(c) + 1), smooth, label=_label(b2, bc), **style)
        ys = [final[(b2, bc, lr)] for lr in lrs]
        ax2.plot(lrs, ys, marker="o", label=_label(b2, bc), **style)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({SMOOTH}-step moving avg, mean of {len(seeds)} seeds)")
    ax.set_title(f"Early training at lr={HIGH_LR:g}, beta1={BETA1}")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel(f"training loss after {epochs} epochs")
    ax2.set_title("Loss after early training vs learning rate (as paper Fig. 4)")
    ax2.legend(fontsize=8)
    fig_name = save(fig, out_dir, "bias_correction.png")

    # ---- tables
    rows = [(f"{b2:g}", "yes" if bc else "no", fmt(first[(b2, bc)]), fmt(peak[(b2, bc)]),
             fmt(final[(b2, bc, HIGH_LR)])) for b2, bc in configs]
    sweep = [(f"{b2:g}", "yes" if bc else "no", *(fmt(final[(b2, bc, lr)]) for lr in lrs)) for b2, bc in configs]

    # ---- verdict: the harm of dropping the correction, measured as the ratio
    # of final losses at the high lr, should be large for beta2=0.9999 and grow with beta2.
    def harm(b2):
        a, b = final[(b2, False, HIGH_LR)], final[(b2, True, HIGH_LR)]
        return math.inf if math.isnan(a) else a / b
    harms = {b2: harm(b2) for b2 in BETA2S}
    helped = {b2: [lr for lr in lrs if final[(b2, False, lr)] < final[(b2, True, lr)]] for b2 in BETA2S}
    unstable = harms[BETA2S[-1]] >= 2.0
    grows = harms[BETA2S[-1]] > harms[BETA2S[0]]
    corrected_ok = all(not math.isnan(final[(b2, True, HIGH_LR)]) for b2 in BETA2S)
    n_ok = sum((unstable, grows, corrected_ok))
    verdict = "reproduced" if n_ok == 3 else ("partially reproduced" if unstable or grows else "not reproduced")
    harm_txt = ", ".join(f"beta2={b2:g}: x{h:.2f}" if math.isfinite(h) else f"beta2={b2:g}: diverged"
                         for b2, h in harms.items())
    summary = (f"loss after {epochs} epochs at lr={HIGH_LR:g}, without / with correction: {harm_txt}")
    body = [
        f"MLP 64-{HIDDEN[0]}-10 on digits, minibatches of {BATCH}, {epochs} epochs (early training), beta1={BETA1}, "
        f"no weight decay, mean over seeds {seeds}. Implementation for both arms: `{impl}` (with correction it "
        f"matches torch.optim.Adam to float rounding; see tests/test_experiments.py).",
        "",
        f"At the high learning rate {HIGH_LR:g}:",
        "",
        table(("beta2", "Bias correction", "Loss, epoch 1", "Peak step loss after step 10",
               f"Loss, epoch {epochs}"), rows),
        "",
        f"Loss after {epochs} epochs over the learning-rate sweep:",
        "",
        table(("beta2", "Bias correction", *(f"lr={lr:g}" for lr in lrs)), sweep),
        "",
        f"![Bias correction]({fig_name})",
        "",
        f"**Finding: {verdict}.** Criteria: dropping the correction multiplies the high-lr loss by at least 2 "
        f"for beta2=0.9999 ({'yes' if unstable else 'no'}), that harm grows from beta2=0.99 to 0.9999 "
        f"({'yes' if grows else 'no'}), and with correction every beta2 trains ({'yes' if corrected_ok else 'no'}). "
        f"Ratios: {harm_txt}.",
        "",
        "Without correction the first updates are (1-beta1)/sqrt(1-beta2) times the corrected ones (1x, 3.2x, 10x "
        "for the three beta2), so at small learning rates dropping it acts like a larger step size and can even "
        "help: without correction the loss is lower at " + "; ".join(
            f"beta2={b2:g}: " + (", ".join(f"lr={lr:g}" for lr in helped[b2]) or "no lr") for b2 in BETA2S)
        + ". The paper's instability shows where that enlarged early step meets an already large learning rate.",
        "",
        "Without correction at beta2=0.9999 and the high learning rate, training is chaotic: the size of the "
        "harm ratio changes with float rounding (thread count, optimizer implementation; during development it "
        "ranged from about 8x to 47x), while its order of magnitude and the ordering across beta2 did not.",
    ]
    return Section("Bias correction (Adam paper, 6.4)", "\n".join(body), [fig_name], verdict, summary,
                   time.perf_counter() - t0)
