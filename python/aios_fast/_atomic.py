"""Atomic file writes for every file users keep (cards, heat maps, weights, summaries, PNGs):
a crash leaves the old file or the new one under the final name, never a partial one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_bytes", "save_figure", "replace_durably", "fsync_dir"]


def _umask() -> int:
    # os.umask can only be read by setting it; done once at import, before threads start
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK = _umask()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file in ``path``'s directory, flush and fsync it, give
    it the permissions a plain ``open(path, "wb")`` would (or the replaced file's), rename it
    over ``path`` with ``os.replace``, then fsync the directory. On any error the temporary
    file is removed and the old ``path`` is untouched. Returns ``path``."""
    path = Path(path)
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = 0o666 & ~_UMASK
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(directory)
    return path


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename inside it survives a crash (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically replace ``path`` with ``data``."""
    return atomic_write(path, lambda f: f.write(data))


def save_figure(fig, path: str | os.PathLike, **savefig_kw) -> Path:
    """Write a matplotlib figure as PNG atomically (``savefig_kw`` go to ``fig.savefig``, e.g.
    ``dpi``), then close it so pyplot does not keep it alive. Returns ``path``."""
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", **savefig_kw))
    finally:
        plt.close(fig)


def replace_durably(tmp: Path, final: Path) -> None:
    """For writers that need a file name rather than a file object (e.g. a row-group Parquet
    writer): fsync the finished ``tmp`` (in ``final``'s directory), rename it over ``final``,
    then fsync the directory."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)

