"""The factory's job journal and its one-run-at-a-time lock.

:class:`Journal` is an append-only JSON-lines file: every step of a run (planned, trained,
gated, added, published, committed) is one line, written with a single ``write`` and
``fsync``-ed before the step it records is considered done, so a run killed at any instant
leaves a journal that says exactly which steps finished. Each line carries a CRC-32 of its
payload; a torn last line (the kill happened inside the ``write``) is recognised and ignored,
while a damaged line anywhere else is an error naming the file and the line (the journal is
evidence, it is never silently rewritten).

:class:`RunLock` is an exclusive ``flock`` on a lock file. The kernel drops the lock when the
holding process dies, however it dies (SIGKILL included), so a crashed holder never blocks the
next run; the file also records the holder's pid, its process start time (from
``/proc/<pid>/stat``, so a recycled pid is told apart) and host, which is how a stale holder
is detected and reported, and how a refused caller learns who holds the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time
import zlib
from pathlib import Path
from typing import Any, Iterator

from .._atomic import fsync_dir
from ..errors import AiosError, InputError

__all__ = ["Journal", "RunLock", "LockHeldError", "JournalError", "process_start_time"]


class LockHeldError(AiosError, RuntimeError):
    """Another live process holds the factory's run lock."""


class JournalError(AiosError, ValueError):
    """The job journal is damaged (a line other than the last fails its checksum or JSON)."""


def _crc(payload: str) -> str:
    return f"{zlib.crc32(payload.encode('utf-8')) & 0xFFFFFFFF:08x}"


class Journal:
    """Append-only, fsynced JSON-lines journal at ``path``.

    Each line is ``{"crc": "<8 hex>", "e": {...}}`` where ``e`` is the event (a JSON object
    with at least ``"event"``); :meth:`append` adds ``"t"`` (POSIX seconds) and ``"seq"``.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._events = self._read()
        self._truncate_torn_tail()

    # ------------------------------------------------------------------ reading
    def _read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        events: list[dict[str, Any]] = []
        self._good_bytes = 0
        for n, line in enumerate(lines, 1):
            last = n == len(lines) or (n == len(lines) - 1 and lines[-1] == b"")
            if not line:
                continue
            try:
                obj = json.loads(line)
                payload = json.dumps(obj["e"], sort_keys=True, separators=(",", ":"))
                if obj.get("crc") != _crc(payload) or not isinstance(obj["e"], dict):
                    raise ValueError("checksum mismatch")
            except (ValueError, KeyError, TypeError) as exc:
                if last and not raw.endswith(b"\n"):
                    break  # torn final write: the step it recorded never completed
                raise JournalError(f"{self.path}:{n}: damaged journal line ({exc}); the journal "
                                   "is append-only evidence - inspect or move it aside") from None
            events.append(obj["e"])
            self._good_bytes += len(line) + 1
        return events

    def _truncate_torn_tail(self) -> None:
        if self.path.exists() and self.path.stat().st_size > getattr(self, "_good_bytes", 0):
            # drop the torn bytes so the next append starts on a clean line
            with open(self.path, "r+b") as f:
                f.truncate(self._good_bytes)
                f.flush()
                os.fsync(f.fileno())

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every event, oldest first (a copy)."""
        return list(self._events)

    def of_run(self, run_id: str) -> list[dict[str, Any]]:
        return [e for e in self._events if e.get("run") == run_id]

    def find(self, **match: Any) -> Iterator[dict[str, Any]]:
        """Events whose fields equal every ``match`` item."""
        for e in self._events:
            if all(e.get(k) == v for k, v in match.items()):
                yield e

    def has(self, **match: Any) -> bool:
        return next(self.find(**match), None) is not None

    def last(self, **match: Any) -> dict[str, Any] | None:
        hits = list(self.find(**match))
        return hits[-1] if hits else None

    # ------------------------------------------------------------------ writing
    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event durably (one write, fsync; the directory is fsynced when the
        file is created). Returns the stored event."""
        if not isinstance(event, str) or not event:
            raise InputError(f"journal event: expected a non-empty string, got {event!r}")
        e = {"event": event, "seq": len(self._events), "t": round(time.time(), 6), **fields}
        payload = json.dumps(e, sort_keys=True, separators=(",", ":"))
        line = json.dumps({"crc": _crc(payload), "e": json.loads(payload)}, sort_keys=True,
                          separators=(",", ":")) + "\n"
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = line.encode("utf-8")
            written = os.write(fd, data)
            if written != len(data):  # a short write on a regular file means a full disk
                raise OSError(f"{self.path}: short write ({written} of {len(data)} bytes)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        stored = json.loads(payload)
        self._events.append(stored)
        return stored


# ---------------------------------------------------------------------- the lock
def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or
    None when the process does not exist or /proc is unavailable. With the pid it identifies
    a process uniquely even after the pid is recycled."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    rest = stat[stat.rfind(")") + 2:].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def _holder_alive(info: dict[str, Any]) -> bool:
    pid = info.get("pid")
    if not isinstance(pid, int) or info.get("host") != socket.gethostname():
        return False
    start = process_start_time(pid)
    if start is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return info.get("start_time") is None
    return info.get("start_time") in (None, start)


class RunLock:
    """Exclusive run lock on ``path`` (see the module docstring).

    ``acquire()`` raises :class:`LockHeldError` naming the holder when a live process holds
    it; ``stale`` is set to the previous holder's record when the lock file names a process
    that died without releasing it (the lock is then taken over). Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self.stale: dict[str, Any] | None = None

    def read_holder(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.read_holder() or {}
            raise LockHeldError(f"another factory run holds {self.path}: pid {holder.get('pid')} on "
                                f"{holder.get('host')} since {holder.get('acquired')}") from None
        previous = self.read_holder()
        if previous and previous.get("pid") is not None and not previous.get("released"):
            # the kernel let us in, so the recorded holder cannot hold the flock any more:
            # it died (or the pid was recycled) without releasing
            if not (previous.get("pid") == os.getpid() and previous.get("start_time") == process_start_time(os.getpid())):
                self.stale = previous
                self.stale["alive"] = _holder_alive(previous)
        me = {"pid": os.getpid(), "start_time": process_start_time(os.getpid()), "host": socket.gethostname(),
              "acquired": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        import fcntl

        if self._fd is None:
            return
        try:
            info = self.read_holder() or {}
            info["released"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, json.dumps(info).encode(), 0)
            os.fsync(self._fd)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
