"""Large scratch buffers backed by transparent huge pages where Linux offers them.

A fresh m × n float32 buffer from the default allocator is first touched one 4 KiB page at a
time: for the 64 MiB delta of a 4096 × 4096 pair that cost ~14 ms on the 2-core reference
VM, as much as a GEMM pass. An anonymous mapping advised ``MADV_HUGEPAGE`` faults in 2 MiB at
a time (~4 ms for the same buffer) on kernels whose THP mode is ``madvise`` or ``always``.
"""

from __future__ import annotations

import mmap
import sys

import numpy as np
import torch

__all__ = ["empty_scratch"]

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
