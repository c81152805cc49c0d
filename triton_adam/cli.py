"""The ``triton-adam`` command: bench, kernels, check, experiments, report.

Thin argparse layer: each subcommand imports its machinery lazily, so ``--help`` is instant and
a missing optional piece only breaks the subcommand that needs it.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from typing import List, Optional

# Exit codes beyond 0/1: the feature needed is not installed or not written yet; Ctrl-C.
EXIT_UNAVAILABLE = 2
EXIT_INTERRUPTED = 130


def _csv(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _console():
    from triton_adam.bench.console import make_console

    return make_console()


def _error(msg: str) -> None:
    _console().print(f"[bold red]error:[/bold red] {msg}", highlight=False)


# ---------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from triton_adam.bench import env, presets, report, runner
    from triton_adam.bench.console import progress_bar
    from triton_adam.bench.providers import OptimConfig

    if args.list:
        con = _console()
        for name in presets.preset_names():
            p = presets.get_preset(name)
            d = presets.describe(p.params())
            con.print(f"{name:16s} {d['num_tensors']:5d} tensors {d['num_params']:>14,d} params  "
                      f"{p.description}", highlight=False)
        return 0

    if args.fsdp2 is not None:
        return cmd_bench_fsdp2(args)
    if args.host:
        return cmd_bench_host(args)
    if args.clip is not None and not (math.isfinite(args.clip) and args.clip > 0):
        _error(f"--clip must be a finite max norm > 0, got {args.clip}")
        return 1
    cfg = runner.BenchConfig(
        device=args.device,
        presets=_csv(args.preset) if args.preset else None,
        dtypes=_csv(args.dtype),
        providers=_csv(args.providers) if args.providers else None,
        optim=OptimConfig(kind=args.optimizer, amsgrad=args.amsgrad, max_grad_norm=args.clip,
                          state_dtype=args.state_dtype, master_weights=args.master_weights,
                          kahan_summation=args.kahan, stochastic_rounding=args.stochastic_rounding),
        warmup=1 if args.quick else 3,
        repeats=args.steps or (5 if args.quick else 20),
        quick=args.quick,
        threads=args.threads,
    )
    try:
        device = runner.resolve_device(cfg.device)
        total = runner.count_cases(cfg, device)
    except (ValueError, KeyError, RuntimeError) as exc:
        _error(str(exc).strip("'\""))
        return 1

    console = _console()
    with progress_bar(console, total) as tick:
        try:
            record = runner.run_bench(cfg, tick)
        except (ValueError, KeyError) as exc:
            _error(str(exc).strip("'\""))
            return 1

    report.print_results(record, console)
    json_path = args.json or report.default_json_path(record, env.device_slug(device))
    written = report.write_json(record, json_path)
    console.print(f"wrote {written}", highlight=False)
    if args.plot:
        try:
            console.print(f"wrote {report.write_plot(record, args.plot)}", highlight=False)
        except ImportError as exc:
            _error(f"--plot needs matplotlib ({exc}); pip install 'triton-adam[plot]'")
            return EXIT_UNAVAILABLE
    if record["interrupted"]:
        console.print("[yellow]interrupted: the table and JSON hold what was measured so far[/yellow]")
        return EXIT_INTERRUPTED
    return 0


# ---------------------------------------------------------------- kernels
# `kernels` options that filter the step kernel's roles -> triton_adam.aot.ROLE_VALUES' keys
KERNEL_FILTERS = {"param_dtype": "param", "state_dtype": "state", "master": "master",
                  "amsgrad": "amsgrad", "amp": "amp"}


def cmd_kernels(args: argparse.Namespace) -> int:
    # AOT compilation must not run under the interpreter; drop the flag before triton loads.
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if "triton" in sys.modules:
            _error("TRITON_INTERPRET is set and triton is already imported; unset it and rerun")
            return 1
        del os.environ["TRITON_INTERPRET"]
    from triton_adam.bench.console import job_progress
    from triton_adam.bench.kernel_report import (KernelReportUnavailable, format_spec,
                                                 kernels_table, load_compile_all)

    try:
        compile_all = load_compile_all()
    except KernelReportUnavailable as exc:
        _error(str(exc))
        return EXIT_UNAVAILABLE
    filters = {role: _csv(getattr(args, option)) for option, role in KERNEL_FILTERS.items()
               if getattr(args, option)}
    scope = args.scope or ("all" if filters else "default")
    workers = args.jobs or os.cpu_count() or 1
    console = _console()
    try:
        with job_progress(console) as (start, done):
            rows = compile_all(
                target=args.target, scope=scope, filters=filters, workers=workers,
                on_start=lambda n: start(n, f"compiling {n} specialisations for {args.target} "
                                            f"on {min(workers, max(n, 1))} processes"),
                on_done=lambda row: done(f"{row['name']} {format_spec(row['spec'])}"))
    except ValueError as exc:
        _error(str(exc))
        return 1
    if not rows:
        _error(f"no specialisation of scope {scope} matches the filters {filters}")
        return 1
    try:
        table = kernels_table(rows, args.target)
    except ValueError as exc:
        _error(str(exc))
        return 1
    console.print(table)
    if scope == "default":
        console.print("[dim]the plain roles (moments and grads in the params' dtype, no master, "
                      "amsgrad or AMP); --scope all for every specialisation, or filter by "
                      "--param-dtype, --state-dtype, --master, --amsgrad, --amp[/dim]",
                      highlight=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"target": args.target, "scope": scope, "filters": filters,
                       "kernels": rows}, f, indent=2, default=str)
    return 0


# ---------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    from triton_adam.bench import parity, runner
    from triton_adam.bench.console import make_table as Table

    make, reason = parity.load_triton_adamw()
    if make is None:
        _error(f"triton_adam.AdamW is not available ({reason})")
        return EXIT_UNAVAILABLE
    device = runner.resolve_device(args.device)
    dtypes = _csv(args.dtype)
    results = parity.run_parity(make, device, dtypes=dtypes, steps=args.steps)
    try:
        context = {r.dtype: r for r in parity.run_parity(parity.torch_fused_adamw, device,
                                                         dtypes=dtypes, steps=args.steps)}
    except Exception:  # fused unsupported for a dtype/device: the context column shows n/a
        context = {}
    table = Table(title=f"triton_adam.AdamW vs torch.optim.AdamW(foreach=False) on {device}, "
                        f"{args.steps} steps",
                  caption="update err = |ours - torch| / |torch - initial| over all params; "
                          "torch fused shows the same figure for torch's own fused AdamW")
    for col in ("dtype", "elements", "max abs err", "max rel err", "update err",
                "torch fused update err", "tolerance", "ok"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for r in results:
        ctx = context.get(r.dtype)
        table.add_row(r.dtype, str(r.numel), f"{r.max_abs:.3e}", f"{r.max_rel:.3e}",
                      f"{r.update_rel_err:.3e}", "n/a" if ctx is None else f"{ctx.update_rel_err:.3e}",
                      f"{r.tolerance:.0e}",
                      "[green]yes[/green]" if r.within_tolerance else "[red]NO[/red]")
    _console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "results": parity.as_dicts(results),
                       "torch_fused": parity.as_dicts(list(context.values()))}, f, indent=2)
    return 0 if all(r.within_tolerance for r in results) else 1


# ---------------------------------------------------------------- experiments
def cmd_experiments(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("sklearn") is None:
        _error("the experiments need scikit-learn: pip install 'triton-adam[experiments]'")
        return EXIT_UNAVAILABLE
    try:
        from triton_adam.experiments import run_experiments
    except Exception as exc:
        _error(f"triton_adam.experiments is not available ({type(exc).__name__}: {exc})")
        return EXIT_UNAVAILABLE
    path = run_experiments(out_dir=args.out, quick=args.quick)
    _console().print(f"report: {path}", highlight=False)
    return 0


# ---------------------------------------------------------------- report
def _load_records(path: str) -> list:
    """The bench records in a file: one record, or a JSON list of them (perf/gpu_check.sh
    gathers every bench of a GPU run into one bench.json)."""
    with open(path) as f:
        data = json.load(f)
    return data if isinstance(data, list) else [data]


def cmd_bench_fsdp2(args: argparse.Namespace) -> int:
    """Host time of step() under FSDP2 on CPU gloo processes (see bench/fsdp2.py)."""
    from triton_adam.bench import env
    from triton_adam.bench.console import make_table
    from triton_adam.bench.fsdp2 import Fsdp2BenchConfig, run

    import torch

    if args.fsdp2 < 1:
        _error(f"--fsdp2 takes a world size >= 1, got {args.fsdp2}")
        return 1
    config = Fsdp2BenchConfig(world_size=args.fsdp2, layers=64 if args.quick else 256,
                              warmup=1 if args.quick else 3,
                              repeats=args.steps or (5 if args.quick else 20))
    record = run(config)
    record["run"] = env.run_metadata(torch.device("cpu"))
    table = make_table(title=f"step() host time under FSDP2: {config.world_size} gloo processes, "
                             f"{record['config']['tensors']} sharded tensors (rank 0)",
                       caption="stubbed: Triton launches replaced by no-ops (the host's share of "
                               "a GPU step); torch fused includes its small CPU kernel work")
    for col in ("provider", "median ms", "µs / tensor", "torch fused / this"):
        table.add_column(col, justify="left" if col == "provider" else "right")
    for r in record["results"]:
        table.add_row(r["provider"], f"{r['host_median_ms']:.2f}", f"{r['us_per_tensor']:.2f}",
                      f"{r['torch_fused_over_this']:.2f}x")
    _show_and_save(table, record, args.json)
    return 0


def _show_and_save(table, record: dict, json_path) -> None:
    """Print a host-time table; write its record as JSON where asked."""
    _console().print(table)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=1)


def cmd_bench_host(args: argparse.Namespace) -> int:
    """Host time of step() per tensor, launches stubbed, beside torch fused (bench/host.py)."""
    from triton_adam.bench import env
    from triton_adam.bench.console import make_table
    from triton_adam.bench.host import HostBenchConfig, run

    import torch

    config = HostBenchConfig(tensors=1024 if args.quick else 4096,
                             warmup=1 if args.quick else 3,
                             repeats=max(args.steps or (20 if args.quick else 30), 20),
                             rounds=1 if args.quick else 3)
    record = run(config)
    record["run"] = env.run_metadata(torch.device("cpu"))
    table = make_table(title=f"step() host time: {config.tensors} float32 tensors of "
                             f"{config.numel} elements (thread CPU time, median of "
                             f"{config.repeats} steps, median of {config.rounds} processes)",
                       caption="triton-adam with its launches stubbed (the host's share of a GPU "
                               "step); torch fused: its whole CPU step, kernel work included; "
                               "like for like: torch fused given the same kind of grads (same, "
                               "fresh or from a backward) as the row")
    for col in ("provider", "mode", "µs / tensor", "first step µs / tensor",
                "torch fused (same grads) / this", "like for like"):
        table.add_column(col, justify="left" if col in ("provider", "mode") else "right")
    for r in record["results"]:
        table.add_row(r["provider"], r["mode"], f"{r['us_per_tensor']:.3f}",
                      f"{r['first_us_per_tensor']:.1f}", f"{r['torch_fused_over_this']:.1f}x",
                      f"{r['like_for_like_torch_fused_over_this']:.1f}x")
    _show_and_save(table, record, args.json)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from triton_adam.bench.console import make_table as Table

    table = Table(title="recorded bench runs",
                  caption="clip: the max norm of a clip + step run (torch providers: "
                          "clip_grad_norm_ then step; triton-adam: fused), - without clipping")
    numbers = ("step ms", "device ms", "host ms", "GB/s", "% copy", "vs fused")
    for col in ("device", "preset", "dtype", "provider", "clip") + numbers:
        table.add_column(col, justify="right" if col in numbers else "left")
    for path in args.files:
        try:
            records = _load_records(path)
        except (OSError, ValueError) as exc:
            _error(f"{path}: {exc}")
            return 1
        for record in records:
            _add_report_rows(table, record)
    _console().print(table)
    return 0


def _add_report_rows(table, record: dict) -> None:
    """One row per measured provider of a record, with the run's clip max norm ("-": none)."""
    from triton_adam.bench.report import device_cell

    dev = record["run"]["device_name"]
    clip = record["config"].get("max_grad_norm") if record["config"].get("clip") else None
    for r in record["results"]:
        if r["status"] != "ok":
            continue
        frac, vs = r.get("fraction_of_copy"), r.get("speedup_vs_fused")
        table.add_row(dev, r["preset"], r["dtype"], r["provider"],
                      "-" if clip is None else f"{clip:g}", f"{r['median_ms']:.3f}",
                      device_cell(r),
                      "n/a" if r.get("host_ms") is None else f"{r['host_ms']:.3f}",
                      "n/a" if r["gbps"] is None else f"{r['gbps']:.1f}",
                      "n/a" if frac is None else f"{100 * frac:.0f}",
                      "n/a" if vs is None else f"{vs:.2f}x")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the ``triton-adam`` command."""
    parser = argparse.ArgumentParser(prog="triton-adam",
                                     description="Benchmarks and checks for triton-adam.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="time Adam/AdamW steps of several implementations")
    b.add_argument("--preset", help="preset name(s), comma-separated (default: llama-3.2-1b on "
                                    "CUDA, gpt2-small-cpu on CPU); see --list")
    b.add_argument("--list", action="store_true", help="list the presets and exit")
    b.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16; comma-separated for several")
    b.add_argument("--optimizer", choices=("adam", "adamw"), default="adamw")
    b.add_argument("--amsgrad", action="store_true")
    b.add_argument("--providers", help="comma-separated subset (default: all)")
    b.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    b.add_argument("--steps", type=int, help="timed steps per provider (default 20, --quick 5)")
    b.add_argument("--json", help="output JSON path (default bench-results/<device>-<date>.json)")
    b.add_argument("--plot", help="write a bar chart PNG here (needs matplotlib)")
    b.add_argument("--quick", action="store_true", help="1 warm-up + 5 timed steps: seconds on CPU")
    b.add_argument("--clip", type=float, metavar="MAX_NORM",
                   help="time clip + step: torch providers run clip_grad_norm_(MAX_NORM) then "
                        "step, triton-adam its fused max_grad_norm=MAX_NORM step")
    b.add_argument("--state-dtype", choices=("fp32", "bf16", "int8", "int4", "fp8"),
                   help="triton-adam's state_dtype (moments in this dtype; bytes counted from "
                        "the real states); the other providers keep theirs")
    b.add_argument("--fsdp2", type=int, metavar="WORLD_SIZE",
                   help="instead: host time of step() under FSDP2 on WORLD_SIZE CPU gloo "
                        "processes, ours (launches stubbed) vs torch fused on the same model")
    b.add_argument("--host", action="store_true",
                   help="instead: host time of step() per tensor (launches stubbed) for each "
                        "mode (same/fresh/backward grads, fused clip, skip_nonfinite, compact "
                        "master + int8), beside torch fused's whole CPU step with same, fresh "
                        "and backward grads; 3 processes a row (--quick: 1); any machine")
    b.add_argument("--threads", type=int, help="torch CPU threads (a busy machine times far more "
                                               "steadily with 1)")
    precision = b.add_mutually_exclusive_group()
    precision.add_argument("--master-weights", choices=("true", "compact"),
                           help="triton-adam's master_weights for bf16/fp16 params (a float32 copy, "
                                "or its 2-byte remainder beside bf16 params); bytes counted")
    precision.add_argument("--kahan", action="store_true",
                           help="triton-adam's kahan_summation (bf16/fp16 params)")
    precision.add_argument("--stochastic-rounding", action="store_true",
                           help="triton-adam's stochastic_rounding (bf16 params)")
    b.set_defaults(func=cmd_bench)

    k = sub.add_parser("kernels", help="compile every kernel specialisation ahead of time and "
                                       "print registers, spills, vector widths, PTX size")
    k.add_argument("--target", default="sm_90")
    k.add_argument("--scope", choices=("default", "all", "ci", "coverage"),
                   help="default (without filters): the plain roles, moments and grads in the "
                        "params' dtype, no master, amsgrad or AMP; all (the default with "
                        "filters): every specialisation the optimizer can launch; ci, coverage: "
                        "the reduced sets CI compiles (see triton_adam.aot.step_kernel_specs)")
    k.add_argument("--jobs", type=int, help="compile processes (default: every core)")
    k.add_argument("--param-dtype", help="only these param dtypes: fp32,bf16,fp16")
    k.add_argument("--state-dtype", help="only these moments: fp32,bf16,fp16,int8,int4,fp8")
    k.add_argument("--master", help="only these: none,fp32,remainder,kahan,sr (stochastic "
                                    "rounding)")
    k.add_argument("--amsgrad", help="off, on or off,on")
    k.add_argument("--amp", help="only these AMP modes: none,found_inf,scale")
    k.add_argument("--json", help="also write the rows as JSON here")
    k.set_defaults(func=cmd_kernels)

    c = sub.add_parser("check", help="parity self-test against torch.optim.AdamW")
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="fp32,bf16,fp16")
    c.add_argument("--steps", type=int, default=5)
    c.add_argument("--json", help="also write the errors as JSON here")
    c.set_defaults(func=cmd_check)

    e = sub.add_parser("experiments", help="run the experiments report (needs scikit-learn)")
    e.add_argument("--quick", action="store_true")
    e.add_argument("--out", default="experiments-out")
    e.set_defaults(func=cmd_experiments)

    r = sub.add_parser("report", help="summarise recorded bench JSON files in one table")
    r.add_argument("files", nargs="+")
    r.set_defaults(func=cmd_report)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``triton-adam`` console script and ``python -m triton_adam``."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
