"""Experiments that show triton-adam trains, and trains like the reference.

``run_experiments(out_dir, quick)`` runs the four studies on scikit-learn's
digits data and the precision study (a char-level GPT and the digits MLP with bfloat16
params), writes PNG plots and ``report.md`` into ``out_dir`` and returns
the report's path. Entry points: ``triton-adam experiments [--quick] [--out DIR]``
and ``python -m triton_adam.experiments [--quick] [--out DIR]``. Needs the
``experiments`` extra (scikit-learn, matplotlib).
"""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

DEFAULT_OUT = os.path.join("perf", "experiments")
EXPERIMENTS = ("trajectory", "convergence", "decoupling", "bias_correction", "precision")

__all__ = ["run_experiments", "DEFAULT_OUT", "EXPERIMENTS"]


def run_experiments(out_dir: str = DEFAULT_OUT, quick: bool = False, *, progress: bool = True,
                    only: Optional[Sequence[str]] = None) -> str:
    """Run the experiments, write plots and ``report.md`` to ``out_dir``, return the report path.

    ``quick`` runs a cut-down version of every experiment (under a minute on
    a 2-core CPU); ``only`` restricts to some of :data:`EXPERIMENTS` (for
    development; the committed report runs all five).
    """
    # Imported here so that `import triton_adam.experiments` (e.g. by the CLI
    # to build its parser) works without the optional dependencies installed.
    import importlib

    import torch

    from . import report
    from .progress import tracking

    try:
        import sklearn  # noqa: F401
    except ImportError as exc:  # pragma: no cover - message only
        raise ImportError("the experiments need scikit-learn: pip install 'triton-adam[experiments]'") from exc

    os.makedirs(out_dir, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # These models are tiny: one thread runs them as fast as two (measured on
    # a 2-core machine), does not collapse when other jobs share the CPU (OpenMP
    # spin-waiting made a run 10x slower there), and a fixed count keeps the
    # float results reproducible.
    threads = 1
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    selected = [e for e in EXPERIMENTS if only is None or e in only]
    sections = []
    start = time.perf_counter()
    try:
        with tracking(progress) as tracker:
            for name in selected:
                module = importlib.import_module(f".{name}", __name__)
                sections.append(module.run(out_dir, quick, tracker, device, threads))
                tracker.log(f"[green]done[/green] {name}: {sections[-1].verdict} ({sections[-1].seconds:.0f} s)")
    finally:
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - start
    command = "triton-adam experiments" + (" --quick" if quick else "")
    desc = device if device == "cpu" else f"{device} ({torch.cuda.get_device_name(0)})"
    return report.write(out_dir, sections, quick=quick, seconds=seconds, device=desc, command=command)
