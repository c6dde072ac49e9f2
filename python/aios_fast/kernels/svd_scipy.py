"""NumPy / SciPy implementations of ``delta_sketch`` and ``orthonormalize``.

Fallbacks that share no code with the torch or compiled paths (a second, independent
implementation the conformance cases check), for CPU installs where SciPy is present. NumPy
has no bfloat16: it is decoded by moving its 16 bits into the top half of a float32, which
is exact.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import backends
from .svd import tile_rows

__all__: list[str] = []


def _scipy_available() -> tuple[bool, str]:
    try:
        import scipy.linalg  # noqa: F401
    except ImportError:
        return False, "scipy is not installed (pip install scipy)"
    return True, "scipy is installed"


def _decode(t: torch.Tensor, dtype) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        bits = t.contiguous().view(torch.int16).numpy().view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).astype(dtype, copy=False)
    return t.numpy().astype(dtype, copy=False)


@backends.register("delta_sketch", "numpy", devices=("cpu",), priority=50,
                   why="NumPy tiles (bfloat16 decoded by bit shift) and NumPy's BLAS; no torch compute")
def _sketch_numpy(T, B, X=None, Y=None, block_rows=None, out=None):
    m, n = T.shape
    cd = np.float64 if T.dtype == torch.float64 else np.float32
    Xn = X.numpy().astype(cd, copy=False) if X is not None else None
    Yn = Y.numpy().astype(cd, copy=False) if Y is not None else None
    out_x = np.empty((m, Xn.shape[1]), cd) if Xn is not None else None
    out_y = np.zeros((n, Yn.shape[1]), cd) if Yn is not None else None
    dst = out.numpy() if out is not None else None
    rows = block_rows or tile_rows(n)
    total = 0.0
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        tile = _decode(T[r0:r1], cd)
        if B is not None:
            tile = tile - _decode(B[r0:r1], cd)
        if dst is not None:
            dst[r0:r1] = tile
        total += float(np.square(tile, dtype=np.float64).sum())
        if Xn is not None:
            np.matmul(tile, Xn, out=out_x[r0:r1])
        if Yn is not None:
            out_y += tile.T @ Yn[r0:r1]
    wrap = (lambda a: torch.from_numpy(a) if a is not None else None)
    return wrap(out_x), wrap(out_y), total


@backends.register("orthonormalize", "scipy", devices=("cpu",), priority=50, available=_scipy_available,
                   why="Householder QR by LAPACK through scipy.linalg.qr (economic mode)")
def _orth_scipy(Y):
    from scipy.linalg import qr

    return torch.from_numpy(qr(Y.numpy(), mode="economic", check_finite=False)[0])
