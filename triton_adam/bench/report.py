"""Presenting a benchmark record: rich table, JSON file, bar-chart PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

from .console import make_console, make_table

# Keys every result row carries, by status; tests check records against these.
ROW_KEYS = {"preset", "dtype", "provider", "description", "version", "status"}
OK_KEYS = ROW_KEYS | {
    "median_ms", "min_ms", "max_ms", "host_ms", "device_ms", "device_min_ms", "host_ahead",
    "repeats", "peak_extra_bytes",
    "bytes_per_step", "bytes_source", "gbps", "fraction_of_copy", "speedup_vs_fused",
    "speedup_vs_triton_adam", "held_bytes", "held_bytes_per_param",
    "clip", "grad_norm", "step_backend",
}
SKIP_KEYS = ROW_KEYS | {"reason"}
RUN_KEYS = {"date", "host", "device", "device_name", "versions", "git_commit"}
TOP_KEYS = {"schema_version", "run", "config", "byte_model", "presets", "copy_bandwidth",
            "results", "interrupted", "warnings"}


def _fmt(value: Optional[float], spec: str, na: str = "n/a") -> str:
    return na if value is None else format(value, spec)


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def precision_title(config: Dict[str, Any]) -> str:
    """triton-adam's precision options of the run, for table titles ("" when none)."""
    optim = config.get("optimizer", {})
    parts = []
    if optim.get("state_dtype"):
        parts.append(f"state_dtype={optim['state_dtype']}")
    if optim.get("master_weights"):
        parts.append(f"master_weights={optim['master_weights']}")
    if optim.get("kahan_summation"):
        parts.append("kahan_summation")
    if optim.get("stochastic_rounding"):
        parts.append("stochastic_rounding")
    return f"triton-adam {' '.join(parts)}" if parts else ""


def clip_title(config: Dict[str, Any]) -> str:
    """What the clipped step is, for table titles; "" when the run did not clip (or predates
    the option)."""
    if not config.get("clip"):
        return ""
    return (f"clip max_norm={config['max_grad_norm']:g} + step (torch providers: "
            f"clip_grad_norm_ then step; triton-adam: fused max_grad_norm)")


def row_note(r: Dict[str, Any]) -> str:
    """The note column: where the bytes come from, and when the fused clip did not run fused."""
    notes = []
    if r["bytes_per_step"] is None:
        notes.append("bytes n/a")
    elif r["bytes_source"] == "state":
        notes.append("bytes from optimizer state")
    if r.get("clip") == "fused" and r.get("step_backend") == "torch":
        # No Triton on this device: the clip runs as unfused torch math, slower than torch's.
        notes.append("torch fallback: clip not fused")
    return "; ".join(notes)


def device_cell(r: Dict[str, Any]) -> str:
    """The device time with the host ahead; "*" marks a median taken over repeats where the
    host did not always get ahead (the step synchronises inside: launch gaps are counted);
    "n/a" for records from before it was measured."""
    if r.get("device_ms") is None:
        return "n/a"
    ahead = r.get("host_ahead")
    return f"{r['device_ms']:.3f}" + ("*" if ahead is not None and ahead < 1 else "")


def results_table(record: Dict[str, Any]):
    """One row per (preset, dtype, provider); skipped and failed providers show their reason."""
    run = record["run"]
    copy = record.get("copy_bandwidth")
    title = f"AdamW step on {run['device_name']} ({run['device']})"
    if record["config"]["optimizer"]["kind"] == "adam":
        title = title.replace("AdamW", "Adam")
    if record["config"]["optimizer"]["amsgrad"]:
        title += ", amsgrad"
    clip = clip_title(record["config"])
    if clip:
        title += f", {clip}"
    precision = precision_title(record["config"])
    if precision:
        title += f", {precision}"
    caption = (f"copy bandwidth {copy['gbps']:.1f} GB/s (read+write)" if copy else "copy bandwidth n/a")
    caption += ("; device ms: the kernels with the host ahead (* not every repeat: the step "
                "synchronises)")
    if record.get("interrupted"):
        caption += " - INTERRUPTED, partial results"
    table = make_table(title=title, caption=caption)
    for col, kw in (
        ("preset", {}), ("dtype", {}), ("provider", {}), ("step ms", {"justify": "right"}),
        ("device ms", {"justify": "right"}), ("host ms", {"justify": "right"}),
        ("GB/s", {"justify": "right"}),
        ("% copy", {"justify": "right"}), ("vs fused", {"justify": "right"}),
        ("held B/param", {"justify": "right"}), ("peak extra", {"justify": "right"}), ("note", {}),
    ):
        table.add_column(col, **kw)
    for r in record["results"]:
        if r["status"] == "ok":
            note = row_note(r)
            frac = r.get("fraction_of_copy")
            vs = r.get("speedup_vs_fused")
            table.add_row(
                r["preset"], r["dtype"], r["provider"], f"{r['median_ms']:.3f}",
                device_cell(r), f"{r['host_ms']:.3f}", _fmt(r["gbps"], ".1f"),
                _fmt(None if frac is None else 100 * frac, ".0f"),
                "n/a" if vs is None else f"{vs:.2f}x", _fmt(r.get("held_bytes_per_param"), ".2f"),
                _fmt_bytes(r["peak_extra_bytes"]), note,
            )
        elif r["status"] == "error":
            table.add_row(r["preset"], r["dtype"], r["provider"], "-", "-", "-", "-", "-", "-",
                          "-", "-", f"error: {r['reason']}", style="red")
    return table


def skipped_lines(record: Dict[str, Any]) -> List[str]:
    """One line per skipped provider and reason (merged across presets and dtypes)."""
    seen: Dict[tuple, List[str]] = {}
    for r in record["results"]:
        if r["status"] == "skipped":
            seen.setdefault((r["provider"], r["reason"]), []).append(f"{r['preset']}/{r['dtype']}")
    return [f"{prov}: {reason}" for (prov, reason) in seen]


def print_results(record: Dict[str, Any], console=None) -> None:
    """Print the table, the skipped providers with their reasons, and the byte-model note."""
    console = console or make_console()
    console.print(results_table(record))
    for line in skipped_lines(record):
        console.print(f"[dim]skipped {line}[/dim]", highlight=False)
    console.print(f"[dim]{record['byte_model']['note']}[/dim]", highlight=False)
    if record["byte_model"].get("clip_note"):
        console.print(f"[dim]{record['byte_model']['clip_note']}[/dim]", highlight=False)
    for warning in record.get("warnings", []):
        console.print(f"[yellow]warning: {warning}[/yellow]", highlight=False)


def write_json(record: Dict[str, Any], path: os.PathLike) -> Path:
    """Write the record as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def default_json_path(record: Dict[str, Any], slug: str, folder: os.PathLike = "bench-results") -> Path:
    """``<folder>/<device-slug>-<YYYY-MM-DD>T<HHMMSS>.json``: one file per run, by device and date."""
    stamp = record["run"]["date"][:19].replace(":", "")
    return Path(folder) / f"{slug}-{stamp}.json"


def validate_record(record: Dict[str, Any]) -> List[str]:
    """Schema problems of a record (empty list when it is well formed)."""
    problems = [f"missing top-level key {k!r}" for k in TOP_KEYS - record.keys()]
    problems += [f"missing run key {k!r}" for k in RUN_KEYS - record.get("run", {}).keys()]
    for i, r in enumerate(record.get("results", [])):
        need = OK_KEYS if r.get("status") == "ok" else SKIP_KEYS
        if r.get("status") not in ("ok", "skipped", "error"):
            problems.append(f"result {i}: bad status {r.get('status')!r}")
        problems += [f"result {i} ({r.get('provider')}): missing {k!r}" for k in need - r.keys()]
    return problems


def write_plot(record: Dict[str, Any], path: os.PathLike) -> Path:
    """Bar chart of GB/s per provider, one panel per (preset, dtype); each bar is labelled with
    its fraction of the measured copy bandwidth, drawn as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in record["results"] if r["status"] == "ok" and r.get("gbps")]
    cases = list(dict.fromkeys((r["preset"], r["dtype"]) for r in ok))
    copy = record.get("copy_bandwidth")
    copy_gbps = copy["gbps"] if copy else None
    n = max(len(cases), 1)
    fig, axes = plt.subplots(n, 1, figsize=(8, 3.2 * n), squeeze=False)
    for ax, case in zip(axes[:, 0], cases or [None]):
        rows = [r for r in ok if (r["preset"], r["dtype"]) == case]
        names = [r["provider"] for r in rows]
        values = [r["gbps"] for r in rows]
        colors = ["tab:orange" if nm == "triton-adam" else "tab:blue" for nm in names]
        bars = ax.barh(names, values, color=colors)
        ax.invert_yaxis()
        for bar, r in zip(bars, rows):
            frac = r.get("fraction_of_copy")
            label = f" {r['gbps']:.1f} GB/s"
            if frac is not None:
                label += f"  ({100 * frac:.0f}% of copy)"
            label += f"  {r['median_ms']:.2f} ms"
            if r.get("device_ms") is not None and r["device_ms"] != r["median_ms"]:
                label += f" (device {r['device_ms']:.2f}, host {r['host_ms']:.2f})"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, label, va="center",
                    fontsize=8)
        if copy_gbps:
            ax.axvline(copy_gbps, color="gray", linestyle="--", linewidth=1)
        right = max(values + [copy_gbps or 0]) if values else 1.0
        ax.set_xlim(0, right * 1.45)
        ax.set_xlabel("GB/s (bytes model / median step time)")
        if case:
            copy_note = f" - dashed: copy {copy_gbps:.0f} GB/s" if copy_gbps else ""
            clip = " (clip + step)" if record["config"].get("clip") else ""
            ax.set_title(f"{case[0]} {case[1]}{clip} on {record['run']['device_name']}{copy_note}",
                         fontsize=10)
        else:
            ax.set_title("no successful provider")
    if cases:  # an empty figure has nothing to lay out (and matplotlib warns)
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
