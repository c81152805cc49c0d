"""Where a run happened: device, versions, git commit, date, host."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, Optional

import torch


def device_name(device: torch.device) -> str:
    """Marketing name of a GPU, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """Short file-name-safe device label, e.g. ``nvidia-h100-80gb-hbm3`` or ``cpu-<host>``."""
    if device.type == "cuda":
        raw = device_name(device)
    else:
        raw = f"cpu-{socket.gethostname()}"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-") or device.type


def git_commit() -> Optional[str]:
    """HEAD of the source tree this package was loaded from, or None outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_dirty() -> Optional[bool]:
    """Whether tracked files differ from HEAD (a run of uncommitted code), None outside git."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _version(dist: str, module: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return getattr(__import__(module), "__version__", None)
    except Exception:
        return None


def run_metadata(device: torch.device) -> Dict[str, Any]:
    """Everything a recorded run needs to be compared with another one later."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cuda_version": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "triton": _version("triton", "triton"),
            "triton_adam": _version("triton-adam", "triton_adam"),
        },
        "git_commit": git_commit(),
        # Untracked files (new modules not yet committed) do not count; HEAD alone may not
        # describe the code that ran, so read this with the date.
        "git_dirty": git_dirty(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        # CPU timings on a shared machine mean little without knowing how busy it was.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
