"""Say, for each peer provider of the bench, its installed version or why it cannot be built.

    python perf/peer_report.py [--json peers.json]

perf/gpu_check.sh runs it right after the offline install of the carried wheels
(perf/fetch_peer_wheels.sh), so a run's log says which peers the benches below it can time.
A peer "loads" when the bench's own loader (``providers.load_factory``) imports it; it is then
built over one small param on the current device and stepped once, which is where a peer that
refuses the device (flashoptim on a CPU) or a broken extension (a CUDA library that does not
match the driver) shows itself. Exit status 0 whatever the peers do: this is a report.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from triton_adam.bench import providers as provs

# torch's own optimizers and ours are not peers; everything else in the bench is.
NOT_PEERS = ("triton-adam", "forloop", "foreach", "fused")


def _try_step(provider: provs.Provider, factory, device: torch.device) -> str:
    """Build the peer over one bf16/fp32 param and step it once: "ok" or the error."""
    cfg = provs.OptimConfig()
    dtype = torch.bfloat16 if provider.low_precision_only else torch.float32
    param = torch.randn(4096, device=device, dtype=dtype)
    param.grad = torch.randn_like(param)
    try:
        factory([param], cfg).step()
        return "ok"
    except Exception as exc:  # a report: every failure is a row, never a crash
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def peer_rows(device: torch.device) -> list:
    """One dict per peer provider: name, package, version, and "step" (ok or the error)."""
    rows = []
    for provider in provs.PROVIDERS:
        if provider.name in NOT_PEERS:
            continue
        factory, reason = provs.load_factory(provider, provs.OptimConfig())
        step = reason if factory is None else _try_step(provider, factory, device)
        rows.append({"provider": provider.name, "package": provider.package,
                     "version": provider.version(), "step": step})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    rows = peer_rows(torch.device(name))
    print(f"peers on {name} (torch {torch.__version__}):")
    for row in rows:
        print(f"  {row['provider']:16s} {row['package']:26s} {row['version'] or '-':10s} "
              f"{row['step']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
