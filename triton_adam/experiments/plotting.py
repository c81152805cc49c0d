"""Matplotlib set-up shared by the experiments: headless backend, one save helper."""
from __future__ import annotations

import os

import matplotlib

# Agg renders to files without a display, which is what CI and servers have.
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (must follow the backend choice)

COLORS = {
    "Adam": "tab:blue", "SGD Nesterov": "tab:orange", "Adagrad": "tab:green", "RMSProp": "tab:red",
}


def save(fig, out_dir: str, name: str, tight: bool = True) -> str:
    """Write ``fig`` as ``out_dir/name`` (PNG), close it, return ``name`` for relative links.

    ``tight=False`` for figures laid out by matplotlib's constrained layout
    (shared colour bars), which ``tight_layout`` would undo.
    """
    if tight:
        fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=110)
    plt.close(fig)
    return name
