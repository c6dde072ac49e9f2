"""Small helpers shared by the engines: device resolution and atomic file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from ..errors import BackendUnavailableError, InputError

__all__ = ["resolve_device", "atomic_write_bytes", "atomic_replace_from"]


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


def atomic_replace_from(tmp: Path, final: Path) -> None:
    """fsync ``tmp`` and rename it over ``final`` (same directory), so readers see old or new, never half."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    # fsync the directory so the rename itself survives a crash (POSIX only).
    try:
        fd = os.open(final.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_beside(final: Path) -> Path:
    """A fresh temporary file name in ``final``'s directory (same filesystem, so rename is atomic)."""
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600; weights are meant to be shared like any model file (reading the umask
    # would mean setting it, which races with other threads)
    os.chmod(name, 0o644)
    return Path(name)


def atomic_write_bytes(final: Path, data: bytes) -> None:
    tmp = temp_path_beside(final)
    try:
        tmp.write_bytes(data)
        atomic_replace_from(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
