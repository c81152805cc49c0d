"""Run test scenarios in a spawned world of gloo processes on loopback, with bounded waits.

Each world runs many scenarios in one set of processes (a spawn costs seconds); each scenario's
outcome on each rank comes back as plain data: "ok" or the traceback text.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import os
import queue
import socket
import traceback

import torch.multiprocessing as mp

# Every collective of a scenario must finish within this, or the rank fails instead of hanging.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, module_name, scenarios, shared_dir, results):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 cores for up to 4 ranks
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    module = importlib.import_module(module_name)
    try:
        for name in scenarios:
            try:
                getattr(module, name)(rank, world_size, shared_dir)
                results.put((name, rank, "ok"))
            except BaseException:  # noqa: BLE001 (reported to the parent)
                results.put((name, rank, traceback.format_exc()))
            try:
                dist.barrier()  # keep ranks in step between scenarios
            except BaseException:  # noqa: BLE001
                results.put(("<barrier>", rank, traceback.format_exc()))
                return
    finally:
        # FSDP2 objects sit in reference cycles; freed at interpreter exit, after gloo's
        # threads, they can kill the rank in std::terminate (see triton_adam/bench/fsdp2.py).
        gc.collect()
        dist.destroy_process_group()


def run_world(world_size: int, module_name: str, scenarios, shared_dir: str,
              timeout_s: float = 300.0) -> dict:
    """Run ``scenarios`` (function names of ``module_name``) on ``world_size`` ranks.

    Returns ``{scenario: {rank: "ok" or traceback}}``; a rank that never reported a scenario
    (it hung or died) has no entry. Every process is joined or killed before returning.
    """
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_worker, daemon=True,
                                 args=(rank, world_size, port, module_name, list(scenarios),
                                       shared_dir, results))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    outcome: dict = {}
    expected = world_size * len(scenarios)
    received = 0
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while received < expected:
            left = (deadline - datetime.datetime.now()).total_seconds()
            if left <= 0:
                break
            try:
                name, rank, status = results.get(timeout=min(left, 5.0))
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    break
                continue
            outcome.setdefault(name, {})[rank] = status
            received += name != "<barrier>"
    finally:
        for process in processes:
            process.join(timeout=10)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
    return outcome


def failures(outcome: dict, scenario: str, world_size: int) -> str:
    """'' when every rank passed ``scenario``, else what went wrong, for an assert message."""
    ranks = outcome.get(scenario, {})
    lines = []
    for rank in range(world_size):
        status = ranks.get(rank)
        if status is None:
            lines.append(f"rank {rank}: no result (hung or died)")
        elif status != "ok":
            lines.append(f"rank {rank}:\n{status}")
    if lines and "<barrier>" in outcome:
        lines.append(f"barrier: {outcome['<barrier>']}")
    return "\n".join(lines)
