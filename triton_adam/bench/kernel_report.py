"""Formatting of ``triton_adam.aot.compile_all`` output for ``triton-adam kernels``.

Contract (owned by ``triton_adam.aot``): a list of dicts with keys ``name``, ``spec`` (constexpr
flags), ``registers``, ``shared_bytes``, ``spill_bytes``, ``ld_vector_width``,
``st_vector_width``, ``ptx_bytes``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List

from .console import make_table

REQUIRED_KEYS = ("name", "spec", "registers", "shared_bytes", "spill_bytes",
                 "ld_vector_width", "st_vector_width", "ptx_bytes")


class KernelReportUnavailable(RuntimeError):
    """``triton_adam.aot`` cannot be imported (not written yet, or broken)."""


def load_compile_all() -> Callable[..., List[Dict[str, Any]]]:
    """``triton_adam.aot.compile_all``, or KernelReportUnavailable with the import error."""
    try:
        from triton_adam.aot import compile_all
    except Exception as exc:
        raise KernelReportUnavailable(
            f"triton_adam.aot.compile_all is not available ({type(exc).__name__}: {exc}); "
            "the ahead-of-time kernel report needs it"
        ) from exc
    return compile_all


def check_rows(rows: List[Dict[str, Any]]) -> None:
    """Raise ValueError when a row breaks the contract, so bad data is not printed as zeros."""
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"compile_all row {i} ({row.get('name')!r}) lacks {', '.join(missing)}")


# the step kernel's MASTER constexpr (kernels/adam_step.py MASTER_*), by name; 0 is omitted
MASTER_NAMES = {0: None, 1: "fp32", 2: "remainder", 3: "kahan"}


def format_spec(spec: Dict[str, Any]) -> str:
    """Compact flags: true booleans by name, false ones omitted, other values as k=v."""
    parts = []
    for k, v in spec.items():
        if k == "MASTER":
            v = MASTER_NAMES.get(v, v)
        if v is True:
            parts.append(k)
        elif v is False or v is None:
            continue
        else:
            parts.append(f"{k}={v}")
    return " ".join(parts) or "-"


def kernels_table(rows: List[Dict[str, Any]], target: str):
    """Rich table, one row per compiled specialisation; spills and scalar access stand out."""
    check_rows(rows)
    table = make_table(title=f"triton-adam kernels, ahead of time for {target}",
                  caption=f"{len(rows)} specialisations")
    for col in ("kernel", "spec", "regs", "smem B", "spill B", "ld vec", "st vec", "PTX KiB"):
        table.add_column(col, justify="left" if col in ("kernel", "spec") else "right",
                         overflow="fold")
    for r in rows:
        spill = str(r["spill_bytes"]) if not r["spill_bytes"] else f"[red]{r['spill_bytes']}[/red]"
        ld = str(r["ld_vector_width"]) if r["ld_vector_width"] > 1 else f"[yellow]{r['ld_vector_width']}[/yellow]"
        st = str(r["st_vector_width"]) if r["st_vector_width"] > 1 else f"[yellow]{r['st_vector_width']}[/yellow]"
        table.add_row(r["name"], format_spec(r["spec"]), str(r["registers"]), str(r["shared_bytes"]),
                      spill, ld, st, f"{r['ptx_bytes'] / 1024:.1f}")
    return table
