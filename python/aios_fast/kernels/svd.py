"""Operations behind :func:`aios_fast.linalg.truncated_svd`.

``delta_sketch``
    One pass over a delta ``D = T − B`` (``B`` may be ``None``: ``D = T``) stored as
    float32 / float16 / bfloat16 (float64 is computed in float64): returns ``(D @ X, Dᵀ @ Y,
    ‖D‖²_F)`` where ``X`` (n, l) and ``Y`` (m, l) are optional float32 (or float64) matrices.
    ``D`` is not materialised: rows are converted in cache-sized tiles and each hot tile is
    multiplied at once — unless ``out`` (m, n, compute dtype) is given, which receives ``D``
    (used to convert once when the caller can afford the memory). This fuses subtraction, up-conversion, the Frobenius norm (needed for
    the energy fractions) and the sketch products of a randomized SVD pass.

``orthonormalize``
    An orthonormal basis ``Q`` (m, l) of the column space of a tall ``Y`` (m, l), ``l ≤ m``.

Implementations: ``cpp`` (OpenMP tile conversion in csrc/cpu/svd.cpp, GEMM by torch),
``cuda`` (tile conversion kernel in csrc/cuda/svd.cu on torch's current stream, GEMM by
cuBLAS through torch), ``cholqr2`` (CholeskyQR2, Fukaya et al. 2014, with Householder
fallback), the NumPy / SciPy fallbacks ``numpy`` and ``scipy`` (kernels/svd_scipy.py) and the
torch references.
"""

from __future__ import annotations

import math

import torch

from .. import _native, backends

__all__ = ["delta_sketch", "orthonormalize", "tile_rows", "cholqr", "cholqr2_factors"]

_HALF = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
_TILE_BYTES = 4 << 20  # float32 tile that stays in L2/L3 while torch multiplies it


def tile_rows(n_cols: int, tile_bytes: int = _TILE_BYTES) -> int:
    """Rows per tile so that a float32 tile of ``n_cols`` columns is about ``tile_bytes``."""
    return max(8, tile_bytes // (4 * max(1, n_cols)))


def _accumulate(tile, r0, r1, X, Y, out_x, out_y):
    if X is not None:
        torch.mm(tile, X, out=out_x[r0:r1])
    if Y is not None:
        out_y.addmm_(tile.T, Y[r0:r1])


def _outputs(m, n, X, Y, dtype, device):
    out_x = torch.empty(m, X.shape[1], dtype=dtype, device=device) if X is not None else None
    out_y = torch.zeros(n, Y.shape[1], dtype=dtype, device=device) if Y is not None else None
    return out_x, out_y


def _compute_dtype(T):
    return torch.float64 if T.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- delta_sketch
def _sketch_torch(T, B, X=None, Y=None, block_rows=None, out=None):
    m, n = T.shape
    cd = _compute_dtype(T)
    out_x, out_y = _outputs(m, n, X, Y, cd, T.device)
    rows = block_rows or tile_rows(n)
    total = torch.zeros((), dtype=torch.float64, device=T.device)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        tile = T[r0:r1].to(cd)
        if B is not None:
            tile = tile - B[r0:r1].to(cd)
        if out is not None:
            out[r0:r1] = tile
        total += tile.double().square().sum()
        _accumulate(tile, r0, r1, X, Y, out_x, out_y)
    return out_x, out_y, float(total)


def _sketch_cpp(T, B, X=None, Y=None, block_rows=None, out=None):
    if T.dtype == torch.float64:  # the compiled tile converter is float32-only
        return _sketch_torch(T, B, X, Y, block_rows, out)
    C = _native.native()
    m, n = T.shape
    T = T.contiguous()
    B = B.contiguous() if B is not None else None
    out_x, out_y = _outputs(m, n, X, Y, torch.float32, T.device)
    rows = block_rows or tile_rows(n)
    buf = torch.empty(rows * n, dtype=torch.float32) if out is None else out.view(-1)
    kind = _HALF[T.dtype]

    def raw(t):
        return (t.view(torch.int16) if t.dtype != torch.float32 else t).reshape(-1).numpy()

    total = 0.0
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        cnt = (r1 - r0) * n
        tile = buf[:cnt] if out is None else buf[r0 * n:r1 * n]
        total += C.delta_tile(raw(T[r0:r1]), raw(B[r0:r1]) if B is not None else None,
                              tile.numpy(), kind)
        _accumulate(tile.view(r1 - r0, n), r0, r1, X, Y, out_x, out_y)
    return out_x, out_y, total


def _sketch_cuda(T, B, X=None, Y=None, block_rows=None, out=None):
    if T.dtype == torch.float64:
        return _sketch_torch(T, B, X, Y, block_rows, out)
    for what, t in (("B", B), ("X", X), ("Y", Y), ("out", out)):
        if t is not None and t.device != T.device:
            from ..errors import InputError

            raise InputError(f"delta_sketch: {what} is on {t.device} but T is on {T.device}; "
                             f"put every operand on one device")
    if T.device.index is not None and T.device.index != torch.cuda.current_device():
        # The kernel launches on the current device with the stream passed in: make T's device
        # current (as token_norms does), else a cuda:1 extraction would run on cuda:0.
        with torch.cuda.device(T.device):
            return _sketch_cuda(T, B, X, Y, block_rows, out)
    C = _native.native()
    m, n = T.shape
    T = T.contiguous()
    B = B.contiguous() if B is not None else None
    out_x, out_y = _outputs(m, n, X, Y, torch.float32, T.device)
    # Bigger tiles on the GPU: the GEMM wants work, L2 is large and launches cost.
    rows = block_rows or tile_rows(n, 64 << 20)
    buf = torch.empty(rows * n, dtype=torch.float32, device=T.device) if out is None else out.view(-1)
    total = torch.zeros(1, dtype=torch.float64, device=T.device)
    stream = torch.cuda.current_stream(T.device).cuda_stream
    kind = _HALF[T.dtype]
    esize = T.element_size()
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        cnt = (r1 - r0) * n
        off = r0 * n * esize
        tile = buf[:cnt] if out is None else buf[r0 * n:r1 * n]
        C.delta_tile_cuda(T.data_ptr() + off, (B.data_ptr() + off) if B is not None else 0,
                          tile.data_ptr(), total.data_ptr(), cnt, kind, stream)
        _accumulate(tile.view(r1 - r0, n), r0, r1, X, Y, out_x, out_y)
    return out_x, out_y, float(total.item())


def _sketch_cases():
    g = torch.Generator().manual_seed(7)
    for dtype, name in ((torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")):
        for m, n in ((37, 53), (300, 129)):
            T = torch.randn(m, n, generator=g).to(dtype)
            B = (T.float() + 0.01 * torch.randn(m, n, generator=g)).to(dtype)
            X = torch.randn(n, 5, generator=g)
            Y = torch.randn(m, 5, generator=g)
            yield f"{name}-{m}x{n}-pair", (T, B, X, Y), {"block_rows": 16}
            yield f"{name}-{m}x{n}-single-xonly", (T, None, X, None), {}
    T = torch.tensor([[65504.0, -0.0, 6.1e-05, 5.96e-08], [1.0, -2.0, 3.0e-6, 1e-7]]).half()
    yield "f16-extremes", (T, None, torch.eye(4), torch.eye(2)), {}


def _sketch_compare(got, expected, case_id):
    for g, e, what in ((got[0], expected[0], "D@X"), (got[1], expected[1], "D^T@Y")):
        assert (g is None) == (e is None), f"{case_id}: {what} presence differs"
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"{case_id}: {what}")
    assert math.isclose(got[2], expected[2], rel_tol=1e-5), f"{case_id}: ‖D‖² {got[2]} vs {expected[2]}"


backends.define("delta_sketch", __doc__.split("``delta_sketch``")[1].split("``orthonormalize``")[0].strip(),
                cases=_sketch_cases, compare=_sketch_compare)


@backends.register("delta_sketch", "cuda", devices=("cuda",), priority=0,
                   why="fused convert+subtract+norm kernel (~2.8 TB/s on an H200), GEMM by cuBLAS on the "
                       "same stream; truncated_svd on the GPU is still 0.43-0.62x svd_lowrank's speed "
                       "(launch- and sync-bound, BENCHMARKS.md: GPU)",
                   available=lambda: ((_native.has("delta_tile_cuda") and torch.cuda.is_available()),
                                      "needs _C built with CUDA and a visible GPU"))
def _reg_cuda(T, B, X=None, Y=None, block_rows=None, out=None):
    return _sketch_cuda(T, B, X, Y, block_rows, out)


@backends.register("delta_sketch", "cpp", devices=("cpu",), priority=10,
                   why="one OpenMP pass converts a cache-sized tile and its norm; torch multiplies the hot tile",
                   available=lambda: (_native.has("delta_tile"), "aios_fast._C has no delta_tile"))
def _reg_cpp(T, B, X=None, Y=None, block_rows=None, out=None):
    return _sketch_cpp(T, B, X, Y, block_rows, out)


@backends.register("delta_sketch", "torch", devices=("*",), priority=100, reference=True,
                   why="reference: per-tile .to(float32) and subtraction in torch")
def _reg_torch(T, B, X=None, Y=None, block_rows=None, out=None):
    return _sketch_torch(T, B, X, Y, block_rows, out)


delta_sketch = _reg_torch  # typed entry for direct use; prefer backends.call


# ------------------------------------------------------------------------- orthonormalize
# CholeskyQR2 is stable when cond(Y) ≲ u^(-1/2) (Yamamoto et al. 2015): ~3e3 in float32,
# ~1e8 in float64. Past that (or when Cholesky fails) fall back to Householder QR.
_COND_LIMIT = {torch.float32: 1e3, torch.float64: 1e7}


def _householder(Y):
    return torch.linalg.qr(Y, mode="reduced")[0]


def _chol_r(Y):
    """R of YᵀY = RᵀR, or None where Cholesky QR would not be stable."""
    R, info = torch.linalg.cholesky_ex(Y.T @ Y, upper=True)
    if int(info) != 0:
        return None
    d = R.diagonal().abs()
    if not bool(torch.isfinite(d).all()) or float(d.min()) <= float(d.max()) / _COND_LIMIT.get(Y.dtype, 1e3):
        return None
    return R


def cholqr(Y):
    """One Cholesky QR sweep: Q = Y R⁻¹ with YᵀY = RᵀR, or None where it would not be stable.
    Orthonormal to ~eps·cond(Y)²: enough alone only for an already nearly orthonormal Y."""
    R = _chol_r(Y)
    return None if R is None else torch.linalg.solve_triangular(R, Y, upper=True, left=False)


def cholqr2(Y):
    """CholeskyQR2: two sweeps, orthonormal to ~eps; None where either would not be stable."""
    Q = cholqr(Y)
    return None if Q is None else cholqr(Q)


def _cholqr2(Y):
    Q = cholqr2(Y)
    return Q if Q is not None else _householder(Y)


def cholqr2_factors(Y):
    """CholeskyQR2 of a tall ``Y`` (m, l) with its factors left unmultiplied: ``(Q1, R2, R)``
    with Y = Q1 R1, Q1 = Q R2 and R = R2 R1, so that Y = Q R with Q = Q1 R2⁻¹ orthonormal.
    A caller that needs only products with Q (Q C = Q1 (R2⁻¹ C)) skips the second m × l
    triangular solve. None where Cholesky QR is not stable: fall back to Householder."""
    R1 = _chol_r(Y)
    if R1 is None:
        return None
    Q1 = torch.linalg.solve_triangular(R1, Y, upper=True, left=False)
    R2 = _chol_r(Q1)
    if R2 is None:
        return None
    return Q1, R2, R2 @ R1


def _orth_cases():
    g = torch.Generator().manual_seed(3)
    yield "f32-tall", (torch.randn(500, 20, generator=g),), {}
    yield "f64-tall", (torch.randn(300, 12, generator=g).double(),), {}
    U = torch.linalg.qr(torch.randn(400, 10, generator=g, dtype=torch.float64))[0]
    yield "f64-cond1e9-fallback", (U * torch.logspace(0, -9, 10, dtype=torch.float64),), {}
    yield "f32-square", (torch.randn(16, 16, generator=g),), {}


def _orth_compare(got, expected, case_id):
    eye = torch.eye(got.shape[1], dtype=got.dtype)
    tol = 1e-4 if got.dtype == torch.float32 else 1e-9
    torch.testing.assert_close(got.T @ got, eye, rtol=0, atol=tol, msg=f"{case_id}: QᵀQ ≠ I")
    torch.testing.assert_close(got @ got.T, expected @ expected.T, rtol=0, atol=tol * 10,
                               msg=f"{case_id}: spans differ")


backends.define("orthonormalize", __doc__.split("``orthonormalize``")[1].split("Implementations:")[0].strip(),
                cases=_orth_cases, compare=_orth_compare)


@backends.register("orthonormalize", "cholqr2", devices=("*",), priority=10,
                   why="CholeskyQR2: two GEMM+Cholesky sweeps, 2-5x faster than Householder on tall-skinny; "
                       "falls back to Householder when the Gram matrix is ill-conditioned")
def _reg_cholqr2(Y):
    return _cholqr2(Y)


@backends.register("orthonormalize", "torch", devices=("*",), priority=100, reference=True,
                   why="reference: Householder QR (torch.linalg.qr)")
def _reg_householder(Y):
    return _householder(Y)


orthonormalize = _reg_cholqr2
