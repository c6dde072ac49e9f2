"""Small helpers shared by the engines: device resolution and temporary paths for atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import BackendUnavailableError, InputError

__all__ = ["resolve_device", "temp_path_beside"]


def resolve_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``; raises when the device cannot run."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device; pass 'cpu' or 'cuda[:N]'") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} asked for, but no CUDA GPU is visible; use device='cpu'")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise InputError(f"device {device!r} is not supported; pass 'cpu' or 'cuda[:N]'")
    return dev


def temp_path_beside(final: Path) -> Path:
    """A fresh temporary file name in ``final``'s directory (same filesystem, so rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600; weights are meant to be shared like any model file (reading the umask
    # would mean setting it, which races with other threads)
    os.chmod(name, 0o644)
    return Path(name)
