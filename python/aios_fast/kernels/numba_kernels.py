"""numba implementations of ``token_norms`` and of the ``delta_sketch`` tile (the ``jit`` extra).

Portable CPU paths for builds without the compiled core, or whose core lacks AVX2/F16C: one
fused, multi-threaded pass per call, where the torch reference makes several passes and
float32 copies. The 16-bit types are decoded through a 65,536-entry float32 lookup table
(exact; built with NumPy, which has float16 and whose bit shift gives bfloat16), so one kernel
serves float16 and bfloat16 alike.

numba is imported, and the kernels compiled, on first use only (compilation takes a few
seconds, once per process: ``cache=False`` because the package directory may be read-only).
Both register *behind* the compiled ``cpp`` kernels, which stay the default where built;
``aios-fast info`` lists them with their availability.
"""

from __future__ import annotations

import functools
import importlib.util

import numpy as np
import torch

from .. import backends
from .norms import NormState, _state_for
from .svd import _accumulate, _outputs, tile_rows

__all__: list[str] = []


def _available() -> tuple[bool, str]:
    if importlib.util.find_spec("numba") is None:
        return False, "numba is not installed (pip install 'aios-fast[jit]')"
    return True, "numba is installed (JIT-compiled on first use)"


@functools.lru_cache(maxsize=None)
def _lut(kind: str) -> np.ndarray:
    """float32 value of every 16-bit pattern of ``kind`` (float16 or bfloat16)."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    if kind == "bfloat16":
        return (bits << 16).view(np.float32).copy()
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile the kernels (once per process)."""
    import numba
    from numba import njit, prange

    @njit(inline="always")
    def val32(x, lut, i, j):
        return x[i, j]

    @njit(inline="always")
    def val16(x, lut, i, j):
        return lut[x[i, j]]

    def make_norms(val):
        @njit(parallel=True, nogil=True, cache=False)
        def norms(x, lut, mask, use_mask, stats, channel):
            rows, cols = x.shape
            nchunks = max(1, min(numba.get_num_threads(), rows))
            step = (rows + nchunks - 1) // nchunks
            part = np.zeros((nchunks, cols))      # float64 channel energy per chunk
            pstat = np.zeros((nchunks, 4))        # count, sum, sumsq, max per chunk
            for c in prange(nchunks):
                for i in range(c * step, min(rows, (c + 1) * step)):
                    if use_mask and not mask[i]:
                        continue
                    tok = np.float32(0.0)         # per-row work in float32, like the kernels
                    for j in range(cols):
                        v = val(x, lut, i, j)
                        sq = v * v
                        tok += sq
                        part[c, j] += sq
                    nrm = np.sqrt(tok)
                    pstat[c, 0] += 1.0
                    pstat[c, 1] += nrm
                    pstat[c, 2] += tok
                    if nrm > pstat[c, 3]:
                        pstat[c, 3] = nrm
            for c in range(nchunks):
                stats[0] += pstat[c, 0]
                stats[1] += pstat[c, 1]
                stats[2] += pstat[c, 2]
                if pstat[c, 3] > stats[3]:
                    stats[3] = pstat[c, 3]
                for j in range(cols):
                    channel[j] += part[c, j]
        return norms

    def make_tile(val):
        @njit(parallel=True, nogil=True, cache=False)
        def tile(t, b, lut, has_b, out):
            rows, cols = t.shape
            total = 0.0
            for i in prange(rows):
                acc = 0.0
                for j in range(cols):
                    d = val(t, lut, i, j)
                    if has_b:
                        d = d - val(b, lut, i, j)
                    out[i, j] = d
                    acc += np.float64(d) * np.float64(d)
                total += acc
            return total
        return tile

    return {"norms32": make_norms(val32), "norms16": make_norms(val16),
            "tile32": make_tile(val32), "tile16": make_tile(val16)}


def _as_numpy(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, str]:
    """(array, lookup table, kernel suffix) for a CPU float32 / float16 / bfloat16 tensor."""
    if x.dtype == torch.float32:
        return x.numpy(), np.zeros(1, np.float32), "32"
    kind = "bfloat16" if x.dtype == torch.bfloat16 else "float16"
    return x.view(torch.int16).numpy().view(np.uint16), _lut(kind), "16"


@backends.register("token_norms", "numba", devices=("cpu",), priority=30, available=_available,
                   why="numba: one fused multi-threaded pass (16-bit types by lookup table); the "
                       "portable CPU path where the compiled cpp kernel is missing or lacks AVX2")
def _token_norms_numba(x: torch.Tensor, state: NormState | None = None,
                       mask: torch.Tensor | None = None) -> NormState:
    state = _state_for(x, state)
    if x.shape[0] == 0 or x.shape[1] == 0:
        if x.shape[0] and x.shape[1] == 0:  # zero-width rows still count as tokens (norm 0)
            n = int(mask.sum()) if mask is not None else x.shape[0]
            state.stats[0] += n
        return state
    arr, lut, suffix = _as_numpy(x.contiguous())
    m = mask.numpy() if mask is not None else np.zeros(1, np.bool_)
    _kernels()["norms" + suffix](arr, lut, m, mask is not None, state.stats.numpy(), state.channel.numpy())
    return state


@backends.register("delta_sketch", "numba", devices=("cpu",), priority=40, available=_available,
                   why="numba: fused convert+subtract+norm tile (16-bit types by lookup table), GEMM "
                       "by torch; the portable CPU path where the compiled cpp tile is missing")
def _sketch_numba(T, B, X=None, Y=None, block_rows=None, out=None):
    if T.dtype == torch.float64:  # the tile kernels are float32-only, like the compiled one
        from .svd import _sketch_torch

        return _sketch_torch(T, B, X, Y, block_rows, out)
    m, n = T.shape
    T = T.contiguous()
    B = B.contiguous() if B is not None else None
    out_x, out_y = _outputs(m, n, X, Y, torch.float32, T.device)
    rows = block_rows or tile_rows(n)
    buf = torch.empty(rows * n, dtype=torch.float32) if out is None else out.view(-1)
    k = _kernels()
    t_all, lut, suffix = _as_numpy(T)
    b_all = _as_numpy(B)[0] if B is not None else t_all[:1]
    total = 0.0
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        tile = (buf[:(r1 - r0) * n] if out is None else buf[r0 * n:r1 * n]).view(r1 - r0, n)
        total += k["tile" + suffix](t_all[r0:r1], b_all[r0:r1] if B is not None else b_all, lut,
                                    B is not None, tile.numpy())
        _accumulate(tile, r0, r1, X, Y, out_x, out_y)
    return out_x, out_y, total
