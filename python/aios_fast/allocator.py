"""glibc malloc thresholds for forward passes over large batches.

glibc serves every allocation above its mmap threshold (adaptive, at most 32 MiB on 64-bit)
with a fresh ``mmap`` and returns it with ``munmap`` when freed. A MiniLM forward over 64×128
tokens allocates activations of 12-50 MiB dozens of times, so each forward faults in 130 000 to
180 000 zero-filled pages (500-700 MB) again.

:func:`keep_large_blocks` raises the mmap and trim thresholds so those blocks stay in the heap
and are reused. Allocations above the threshold still get their own mapping, and free memory
past ``threshold`` at the top of the heap is still returned to the OS. Measured on the Leaf VM
(``benchmarks/bench_allocator.py``, BENCHMARKS.md "glibc malloc"): page faults per forward
down 7-10×, forward CPU time 0-13 % lower, and a peak resident set 100-250 MB higher (blocks
freed below the top of the heap stay mapped). That trade suits a job that runs big batches and
exits, not a node that runs for days, and a gain too small to impose: it is opt-in.

The setting is process-wide, so the library never applies it on import. The ``aios-fast``
command line applies it when ``AIOS_FAST_MALLOC=<MiB>`` is set (:func:`from_environment`); an
application embedding aios-fast may call :func:`keep_large_blocks` itself (256 MiB unless
``AIOS_FAST_MALLOC`` says otherwise; ``AIOS_FAST_MALLOC=system`` makes it a no-op).
Settings the user gave glibc directly (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``,
or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
from typing import Any, Mapping

from .errors import InputError

__all__ = ["keep_large_blocks", "from_environment", "malloc_setting", "DEFAULT_THRESHOLD"]

DEFAULT_THRESHOLD = 256 << 20
_MAX = 1 << 30  # mallopt takes an int; a block over 1 GiB is rare enough to keep its own mapping
ENV = "AIOS_FAST_MALLOC"

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_state: dict[str, Any] = {"applied": False, "threshold": None, "reason": "not configured by aios-fast"}


def _user_malloc_settings(env: Mapping[str, str]) -> str | None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"):
        if name in env:
            return f"{name} is set in the environment"
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES sets glibc.malloc tunables"
    return None


def _threshold_from_env(env: Mapping[str, str]) -> int | None:
    """The threshold ``AIOS_FAST_MALLOC`` asks for: None for ``system``."""
    raw = env.get(ENV, "").strip()
    if not raw:
        return DEFAULT_THRESHOLD
    if raw.lower() == "system":
        return None
    try:
        mib = int(raw)
    except ValueError:
        mib = -1
    if not 1 <= mib <= _MAX >> 20:
        raise InputError(f"{ENV}={raw!r}: expected 'system' or a threshold in MiB from 1 to {_MAX >> 20}")
    return mib << 20


def _mallopt():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def keep_large_blocks(threshold: int | None = None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keep freed blocks up to ``threshold`` bytes in glibc's heap for reuse (see the module doc).

    ``threshold`` None takes ``AIOS_FAST_MALLOC`` (default 256 MiB). Returns :func:`malloc_setting`.
    Safe to call more than once; a no-op off glibc, with ``AIOS_FAST_MALLOC=system`` (also when
    ``threshold`` is given), or where the user configured glibc's malloc through its own
    environment variables.
    """
    env = os.environ if env is None else env
    wanted = _threshold_from_env(env)  # validates AIOS_FAST_MALLOC even when threshold is given
    if wanted is None:  # the operator's "system" outranks the embedding application's call
        return _set(False, None, f"{ENV}=system: glibc's defaults kept")
    if threshold is None:
        threshold = wanted
    elif not isinstance(threshold, int) or isinstance(threshold, bool) or not 1 << 20 <= threshold <= _MAX:
        raise InputError(f"threshold: expected bytes from 1 MiB to 1 GiB, got {threshold!r}")
    user = _user_malloc_settings(env)
    if user is not None:
        return _set(False, None, f"{user}: left to the user")
    mallopt = _mallopt()
    if mallopt is None:
        return _set(False, None, "not glibc: the C library's allocator is left as it is")
    if not (mallopt(_M_MMAP_THRESHOLD, threshold) and mallopt(_M_TRIM_THRESHOLD, threshold)):
        return _set(False, None, f"glibc refused mallopt thresholds of {threshold} bytes")
    return _set(True, threshold, f"blocks up to {threshold >> 20} MiB reused from the heap")


def from_environment(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Apply :func:`keep_large_blocks` only if ``AIOS_FAST_MALLOC`` names a threshold in MiB
    (what the ``aios-fast`` command line does before every command)."""
    env = os.environ if env is None else env
    if not env.get(ENV, "").strip():
        return _set(False, None, f"glibc's defaults ({ENV} unset)")
    return keep_large_blocks(env=env)


def malloc_setting() -> dict[str, Any]:
    """What :func:`keep_large_blocks` did in this process: ``applied``, ``threshold``, ``reason``."""
    return dict(_state)


def _set(applied: bool, threshold: int | None, reason: str) -> dict[str, Any]:
    with _lock:
        if applied or not _state["applied"]:  # an earlier mallopt stays in force: report that one
            _state.update(applied=applied, threshold=threshold, reason=reason)
        return dict(_state)
