"""The federation's worker threads (hashing and writing received chunks, fsyncing admitted
cards), shared by the client and the manager."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

__all__ = ["workers"]


def workers() -> ThreadPoolExecutor:
    """Threads that hash and write received chunks (and fsync admitted cards). Kept for the
    process (one pool per pid: a forked child gets its own), since starting a thread per fetch
    cost milliseconds on a loaded machine. Each fetch keeps at most one chunk in flight, so
    fetches share the pool without reordering their bytes."""
    return _pool_of(os.getpid())


@lru_cache(maxsize=1)
def _pool_of(pid: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="aios-fetch")
