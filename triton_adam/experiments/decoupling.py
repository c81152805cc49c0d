"""Experiment 3: is AdamW's good region axis-aligned? (Loshchilov & Hutter, Fig. 2)

Test error over a learning-rate x weight-decay grid for three ways of
regularising Adam, each with a cosine learning-rate schedule, trained on a
small subset of digits so that regularisation matters:

* Adam with L2 (``weight_decay`` added to the gradient, as torch.optim.Adam);
* AdamW as in the paper: ``p *= 1 - eta_t * wd`` (decay follows the schedule
  multiplier ``eta_t`` but not the learning rate);
* AdamW as torch.optim.AdamW: ``p *= 1 - lr_t * wd``.

The paper finds the best weight decay for AdamW hardly depends on the learning
rate (an axis-aligned basin) while for Adam with L2 they are coupled (a
diagonal basin). We measure that with the correlation between log10(lr) and
log10(wd) over the cells of the good region.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from .data import load
from .models import mlp
from .optimizers import make_adam, make_adamw
from .plotting import plt, save
from .report import Section, fmt, table
from .training import evaluate, train

# 1e-4 underfits in this budget whatever the decay; 0.1 bounds the grid above.
LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]

# Each form needs its own decay range: L2 acts through the normalised
# gradient, the schedule form is a per-step fraction, torch's form is
# multiplied by lr first. Each range runs from "no visible effect" to
# "clearly harmful" so the good region is bounded along the decay axis;
# zero is included as the no-regularisation baseline.
METHODS = {
    "adam_l2": dict(title="Adam + L2 (torch.optim.Adam form)",
                    wds=[0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]),
    "adamw_schedule": dict(title="AdamW, decay x schedule (paper form)",
                           wds=[0, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]),
    "adamw_torch": dict(title="AdamW, decay x lr (torch.optim.AdamW form)",
                        wds=[0, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0]),
}

TRAIN_SIZE = 300
BATCH = 50
HIDDEN = [256]
# A cell belongs to the good region if its test error is within this many
# percentage points of the best cell of its map.
BASIN_MARGIN_PP = 1.0


def _optimizer(method: str, params, lr: float, wd: float):
    if method == "adam_l2":
        return make_adam(params, lr=lr, weight_decay=wd)
    return make_adamw(params, lr=lr, weight_decay=wd, schedule_decay=(method == "adamw_schedule"))


def run_cell(method: str, lr: float, wd: float, seed: int, data, epochs: int, device: str):
    """Train one grid cell; return (test error, final train loss, implementation label)."""
    model = mlp(HIDDEN, seed=seed).to(device)
    opt, impl = _optimizer(method, model.parameters(), lr, wd)
    total = epochs * math.ceil(data.x_train.shape[0] / BATCH)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    hist = train(model, opt, data, epochs=epochs, batch_size=BATCH, seed=seed, scheduler=sched)
    if hist.diverged:
        return 1.0, math.nan, impl
    return evaluate(model, data.x_test, data.y_test)[1], hist.final_epoch_loss, impl


def basin_stats(err: np.ndarray, lrs, wds) -> dict:
    """Shape of the good region of one heat map (rows = lr, columns = wd).

    ``corr`` is the Pearson correlation of log10(lr) and log10(wd) over the
    good cells with wd > 0: about 0 for an axis-aligned region, clearly
    negative for a diagonal one (more lr wants less decay). ``slope`` fits
    log10(best wd of the row) on log10(lr) over rows that reach the region.
    """
    best = float(np.min(err))
    good = err <= best + BASIN_MARGIN_PP / 100
    li, wi = np.nonzero(good[:, 1:])
    x, y = np.log10(np.asarray(lrs)[li]), np.log10(np.asarray(wds[1:])[wi])
    corr = float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 else 0.0
    rows = [i for i in range(len(lrs)) if good[i].any()]
    row_best = [int(np.argmin(err[i, 1:])) + 1 for i in rows]
    slope = math.nan
    if len(rows) >= 2:
        slope = float(np.polyfit(np.log10(np.asarray(lrs)[rows]), np.log10(np.asarray(wds)[row_best]), 1)[0])
    return dict(best=best, corr=corr, slope=slope, n_good=int(good.sum()), good=good,
                best_cell=np.unravel_index(int(np.argmin(err)), err.shape))


def _heatmap(ax, err, lrs, wds, title, stats, vmin, vmax):
    im = ax.imshow(err * 100, origin="lower", cmap="viridis_r", aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(wds)), [f"{w:g}" for w in wds], rotation=45)
    ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
    ax.set_xlabel("weight decay")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{title}\nbest {stats['best'] * 100:.2f} %, corr(log lr, log wd) = {stats['corr']:+.2f}",
                 fontsize=9)
    for i in range(err.shape[0]):
        for j in range(err.shape[1]):
            ax.text(j, i, f"{err[i, j] * 100:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if err[i, j] * 100 > (vmin + vmax) / 2 else "black")
            if stats["good"][i, j]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=1.2))
    bi, bj = stats["best_cell"]
    # In the cell's corner so the number stays readable.
    ax.plot(bj + 0.32, bi + 0.28, marker="*", ms=11, color="red", mec="white", mew=0.6)
    return im


def run(out_dir: str, quick: bool, tracker, device: str, threads: int) -> Section:
    """Run experiment 3 and return its report section."""
    t0 = time.perf_counter()
    # Half the digits are held out so the test error has a fine resolution
    # (1/899 per image); the model sees only TRAIN_SIZE of the other half.
    data = load(seed=0, test_fraction=0.5, train_size=TRAIN_SIZE).to(device)
    epochs = 8 if quick else 80
    seeds = [0] if quick else [0, 1]
    lrs = LRS[1:4:2] if quick else LRS
    methods = {k: dict(v, wds=(v["wds"][:1] + v["wds"][3:4] if quick else v["wds"])) for k, v in METHODS.items()}
    advance = tracker.task("3 decoupling", total=len(seeds) * len(lrs) * sum(len(m["wds"]) for m in methods.values()))

    maps, stats, impls = {}, {}, {}
    for key, m in methods.items():
        err = np.zeros((len(lrs), len(m["wds"])))
        for i, lr in enumerate(lrs):
            for j, wd in enumerate(m["wds"]):
                vals = []
                for seed in seeds:
                    e, _, impls[key] = run_cell(key, lr, wd, seed, data, epochs, device)
                    vals.append(e)
                    advance()
                err[i, j] = np.mean(vals)
        maps[key], stats[key] = err, basin_stats(err, lrs, m["wds"])

    fig, axes = plt.subplots(1, len(methods), figsize=(6.3 * len(methods), 5.6), layout="constrained")
    # One colour scale for all maps, saturated at 3x the best error so the
    # differences near the optimum stay visible next to diverged cells.
    vmin = min(s["best"] for s in stats.values()) * 100
    vmax = min(max(float(e.max()) for e in maps.values()) * 100, 3 * vmin)
    for ax, (key, m) in zip(axes, methods.items()):
        im = _heatmap(ax, maps[key], lrs, m["wds"], m["title"], stats[key], vmin, vmax)
    fig.colorbar(im, ax=list(axes), label="test error (%), saturated", shrink=0.9)
    fig.suptitle(f"Digits, {TRAIN_SIZE} training images, cosine schedule, {epochs} epochs; "
                 f"star = best cell, red boxes = within {BASIN_MARGIN_PP:g} pp of best", fontsize=10)
    fig_name = save(fig, out_dir, "decoupling.png", tight=False)

    rows = []
    for key, m in methods.items():
        s = stats[key]
        bi, bj = s["best_cell"]
        rows.append((m["title"], f"`{impls[key]}`", f"{s['best'] * 100:.2f} %", f"lr={lrs[bi]:g}, wd={m['wds'][bj]:g}",
                     f"{maps[key][bi, 0] * 100:.2f} %", s["n_good"], f"{s['corr']:+.2f}",
                     fmt(s["slope"]) if not math.isnan(s["slope"]) else "-"))

    # ---- verdict: paper's claim = AdamW (schedule form) axis-aligned, Adam+L2 coupled.
    c_sched, c_l2, c_torch = (stats[k]["corr"] for k in ("adamw_schedule", "adam_l2", "adamw_torch"))
    # Coupling may show either sign (more lr wanting less decay, or more), so
    # the test is on the size of the correlation.
    aligned, coupled = abs(c_sched) < 0.3, abs(c_l2) >= 0.5
    if aligned and coupled:
        verdict = "reproduced"
    elif abs(c_sched) < abs(c_l2):
        verdict = "partially reproduced"
    else:
        verdict = "not reproduced"
    most_aligned = min(stats, key=lambda k: abs(stats[k]["corr"]))
    edges = [f"{methods[k]['title']} (lr={lrs[s['best_cell'][0]]:g}, wd={methods[k]['wds'][s['best_cell'][1]]:g})"
             for k, s in stats.items()
             if s["best_cell"][0] in (0, len(lrs) - 1) or s["best_cell"][1] == len(methods[k]["wds"]) - 1]
    better = stats["adamw_schedule"]["best"] <= stats["adam_l2"]["best"]
    summary = (f"corr(log lr, log wd) over the good region: AdamW schedule form {c_sched:+.2f}, Adam+L2 {c_l2:+.2f}, "
               f"torch AdamW form {c_torch:+.2f}; best test error AdamW {stats['adamw_schedule']['best'] * 100:.2f} % "
               f"vs Adam+L2 {stats['adam_l2']['best'] * 100:.2f} %.")
    body = [
        f"MLP 64-{HIDDEN[0]}-10 trained on {TRAIN_SIZE} digits (stratified subset) with minibatches of {BATCH} for "
        f"{epochs} epochs, cosine learning-rate schedule to zero (per step); test error on the held-out "
        f"{data.x_test.shape[0]} images, mean over seeds {seeds}. Each map has its own weight-decay axis because "
        f"the three forms scale differently; wd=0 is the unregularised baseline column.",
        "",
        table(("Method", "Implementation", "Best test error", "Best cell", "Error at best lr, wd=0",
               f"Cells within {BASIN_MARGIN_PP:g} pp", "corr(log lr, log wd)", "slope of row-best wd"), rows),
        "",
        f"![Test error heat maps]({fig_name})",
        "",
        ("Best cell on the edge of its grid (the optimum may lie outside): " + "; ".join(edges) + "."
         if edges else "Every best cell lies inside its grid."),
        "",
        f"How to read the numbers: the good region is every cell within {BASIN_MARGIN_PP:g} percentage point of the "
        f"map's best. Over its cells with wd > 0, the correlation between log10(lr) and log10(wd) is near 0 when "
        f"the region is axis-aligned (the best decay does not depend on the learning rate) and near -1 or +1 "
        f"when it runs diagonally. The slope fits log10(best wd of each row) on log10(lr) over rows that reach the region "
        f"(0: independent; -1: the product lr x wd is what matters). With {len(seeds)} seed(s) and a "
        f"{data.x_test.shape[0]}-image test set, differences below about 0.5 pp are within noise.",
        "",
        f"**Finding: {verdict}.** The paper's claim is that AdamW's basin is axis-aligned (|corr| < 0.3 here) while "
        f"Adam with L2 couples the two (|corr| >= 0.5 here). Measured: {summary} "
        + ("AdamW's best cell is at least as good as Adam+L2's, as in the paper." if better else
           "Adam+L2's best cell is better than AdamW's here, unlike the paper."),
        "",
        ("Torch's form multiplies the decay by the learning rate, so for it a diagonal region is expected even "
         "when the paper's form is axis-aligned; its correlation is reported for comparison, not as a test. "
         f"On this problem the most axis-aligned map is **{methods[most_aligned]['title']}** "
         f"(|corr| {abs(stats[most_aligned]['corr']):.2f}). Weight decay improves the best test error over the "
         f"wd=0 column of the same map by " + ", ".join(
             f"{(float(np.min(maps[k][:, 0])) - stats[k]['best']) * 100:.2f} pp ({k})" for k in methods) + "."),
    ]
    return Section("Decoupled weight decay (AdamW paper, Fig. 2)", "\n".join(body), [fig_name], verdict, summary,
                   time.perf_counter() - t0)
