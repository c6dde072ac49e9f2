"""Large scratch buffers backed by transparent huge pages where Linux offers them.

A fresh m × n float32 buffer from the default allocator is first touched one 4 KiB page at a
time: for the 64 MiB delta of a 4096 × 4096 pair that cost ~14 ms on the 2-core reference
VM, as much as a GEMM pass. An anonymous mapping advised ``MADV_HUGEPAGE`` faults in 2 MiB at
a time (~4 ms for the same buffer) on kernels whose THP mode is ``madvise`` or ``always``.
"""

from __future__ import annotations

import mmap
import sys
import threading

import numpy as np
import torch

__all__ = ["empty_scratch", "ScratchPool", "SCRATCH"]

# Below 32 MiB (glibc's largest dynamic mmap threshold on 64-bit) the default allocator serves
# a freed buffer's pages again, so a repeated call faults nothing; a fresh huge-page mapping
# there cost 5-30 ms for 16 MiB on the reference VM (huge-page faults and zeroing), against
# 4-5 ms for the whole first sketch pass on reused pages.
_MIN_BYTES = 32 << 20
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def empty_scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised tensor, on the CPU backed by huge pages when that is possible.

    Falls back to ``torch.empty`` off Linux, on other devices, for small buffers, for dtypes
    numpy cannot hold, and when the mapping or the advice is refused. The memory is returned
    to the system when the tensor is freed (the tensor owns the numpy array, which owns the
    mapping)."""
    device = torch.device(device)
    nbytes = int(np.prod(shape)) * torch.tensor([], dtype=dtype).element_size()
    if (device.type != "cpu" or nbytes < _MIN_BYTES or dtype not in _NUMPY
            or not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE")):
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except OSError:
        return torch.empty(shape, dtype=dtype)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass  # THP disabled: still a valid (4 KiB-paged) buffer
    return torch.from_numpy(np.frombuffer(buf, dtype=_NUMPY[dtype]).reshape(shape))


class ScratchPool:
    """Scratch buffers kept between calls, so that a run of same-shaped work (the modules of a
    checkpoint in a batch extraction, a benchmark's rounds) faults its buffer in once instead of
    once per call: on the reference VM a fresh 46 MB huge-page buffer took 0-50 ms of faults
    (52-100 ms per 2048 x 5632 SVD), a reused one none.

    ``take`` hands out a free buffer of the exact shape, dtype and device, or a new one;
    ``give`` returns it. At most ``max_bytes`` are kept (the most recently returned first);
    ``clear`` frees them all. Thread-safe: a buffer is never handed to two callers at once."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = max_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        with self._lock:
            for i, t in enumerate(self._free):
                if tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device == device:
                    return self._free.pop(i)
        return empty_scratch(shape, dtype, device)

    def give(self, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            return  # device memory has its own caching allocator
        with self._lock:
            self._free.insert(0, t)
            kept, total = [], 0
            for b in self._free:
                size = b.numel() * b.element_size()
                if total + size <= self.max_bytes:
                    kept.append(b)
                    total += size
            self._free = kept

    def clear(self) -> None:
        with self._lock:
            self._free = []

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() * b.element_size() for b in self._free)


#: the process's pool (``truncated_svd``'s materialised deltas)
SCRATCH = ScratchPool()
