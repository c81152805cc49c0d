"""Tests for triton_adam.experiments: the quick run end to end, and the reference Adam."""
from __future__ import annotations

import os
import re

import pytest
import torch

from triton_adam.experiments.reference_adam import ReferenceAdam


def _train_pair(ref_kwargs, torch_cls, torch_kwargs, steps=25):
    """Run ReferenceAdam and a torch optimizer on identical problems; return both parameter sets."""
    out = []
    for make in (lambda p: ReferenceAdam(p, **ref_kwargs), lambda p: torch_cls(p, **torch_kwargs)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
        opt = make(model.parameters())
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_reference_adam_matches_torch_adam(wd):
    kw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    ref, tor = _train_pair(kw, torch.optim.Adam, dict(kw, foreach=False))
    for a, b in zip(ref, tor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_reference_adam_decoupled_matches_torch_adamw():
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    ref, tor = _train_pair(dict(kw, weight_decay_mode="decoupled"), torch.optim.AdamW, dict(kw, foreach=False))
    for a, b in zip(ref, tor):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_reference_adam_variants():
    p = torch.nn.Parameter(torch.ones(3))
    # Without bias correction the first step is lr * (1-b1) g / ((1-b2)^0.5 |g|),
    # i.e. (1-b1)/sqrt(1-b2) times the corrected step: 0.1/0.1 = 1 for b2=0.99.
    opt = ReferenceAdam([p], lr=0.1, betas=(0.9, 0.99), eps=0.0, bias_correction=False)
    p.grad = torch.full((3,), 2.0)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))
    # Schedule-form decay follows lr / initial_lr, not lr itself.
    q = torch.nn.Parameter(torch.ones(1))
    opt = ReferenceAdam([q], lr=1.0, weight_decay=0.1, weight_decay_mode="schedule")
    opt.param_groups[0]["initial_lr"] = 2.0
    q.grad = torch.zeros(1)
    opt.step()
    torch.testing.assert_close(q.detach(), torch.tensor([1 - 0.5 * 0.1]))
    with pytest.raises(ValueError):
        ReferenceAdam([q], weight_decay_mode="bogus")


def test_quick_run_writes_report_and_plots(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    from triton_adam.experiments import run_experiments

    # as on a CPU machine without the interpreter flag: backend="auto" takes the torch fallback
    # (the same numbers; the kernels are tested elsewhere, and through the interpreter these
    # studies took 4 of the suite's 16 minutes); the trajectory study still runs its Triton
    # path in subprocesses that set the flag themselves
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    path = run_experiments(str(tmp_path), quick=True, progress=False)
    assert os.path.isfile(path) and os.path.getsize(path) > 0
    text = open(path).read()
    for title in ("Same trajectory", "Convergence races", "Decoupled weight decay", "Bias correction",
                  "Precision ladder"):
        assert title in text
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## Environment", "## Closing note"):
        assert heading in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert set(images) >= {"trajectory.png", "convergence.png", "decoupling.png", "bias_correction.png",
                           "precision.png"}
    # the precision study: every triton-adam rung trained (peers may be missing), and the memory table
    for run in ("pure bf16", "bf16 + master (compact)", "bf16 + Kahan", "bf16 + stochastic rounding"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {run} |"))
        assert "n/a" not in row.split("|")[3], row
    for name in images:
        png = tmp_path / name
        assert png.is_file() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_module_entry_point_parses_arguments():
    from triton_adam.experiments.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_char_lm_is_a_causal_model_built_from_its_config():
    """The char-level GPT: logits per position, and position t never sees positions after t."""
    from triton_adam.experiments.char_lm import CharData, CharGPT, GPTConfig, corpus

    text = corpus(5000, seed=1)
    assert corpus(5000, seed=1) == text and corpus(5000, seed=2) != text
    data = CharData(text, context=16)
    model = CharGPT(GPTConfig(vocab_size=data.vocab_size, context=16, d_model=32, n_layers=1,
                              n_heads=2), seed=0)
    x, y = data.batch("train", 4, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    logits = model(x)
    assert logits.shape == (4, 16, data.vocab_size)
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % data.vocab_size
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])
