"""What a report says about the machine it ran on: CPU, cores, memory, GPUs, load, versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

from ..allocator import malloc_setting

__all__ = ["machine_info", "versions", "load_average"]

_PACKAGES = ("aios-fast", "torch", "numpy", "transformers", "safetensors", "pyarrow", "scipy",
             "scikit-learn", "peft", "mergekit")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):  # pragma: no cover - Windows
        return None


def machine_info(profile=None) -> dict[str, Any]:
    """CPU model, logical cores, RAM, GPUs (from ``profile``, an ``aios_fast.hardware``
    HardwareProfile), OS, the load average now, and the glibc malloc setting in force."""
    import torch

    gpus = [] if profile is None else [
        {"index": g.index, "name": g.name, "memory_gb": g.memory_gb, "capability": g.capability}
        for g in profile.gpus]
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "ram_gb": None if profile is None else profile.ram_gb,
        "gpus": gpus,
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "malloc": malloc_setting(),
    }


def versions(mergekit_version: str | None = None) -> dict[str, str | None]:
    """Installed versions of Python, aios-fast and the libraries the figures depend on (None when
    absent). mergekit usually lives in its own environment: pass the version it reported."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out["aios-fast"] is None:  # running from a source tree
        from .. import __version__

        out["aios-fast"] = f"{__version__} (source tree)"
    if mergekit_version:
        out["mergekit"] = mergekit_version
    out["aios-fast-git"] = _git_commit()
    return out


def _git_commit() -> str | None:
    """The source tree's commit (``+dirty`` with local changes) when running from a checkout."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
