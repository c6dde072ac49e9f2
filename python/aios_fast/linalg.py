"""Randomized truncated SVD of a matrix or of a delta between two checkpoints.

Public entry point: :func:`truncated_svd`. The passes over a pair, or over a float16 /
bfloat16 matrix, go through the ``delta_sketch`` operation of the dispatch table (see
:mod:`aios_fast.kernels.svd`); a float32 / float64 matrix needs no conversion and is
multiplied where it lies. The orthonormalisations go through ``orthonormalize``.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from . import backends
from ._alloc import SCRATCH
from .errors import InputError
from .kernels.svd import cholqr, cholqr2, cholqr2_factors

__all__ = ["truncated_svd", "SVDResult", "SVD_METHODS", "free_scratch"]

_MATERIALIZE_BYTES = 512 << 20  # fp32 delta size up to which "auto" converts once
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
Matrix = Union[torch.Tensor, np.ndarray]


class SVDResult(tuple):
    """``(U, S, Vh)`` — unpacks like ``torch.linalg.svd`` — plus what the passes measured.

    Attributes: ``U`` (m, k), ``S`` (k,) descending, ``Vh`` (k, n); ``frob_sq`` the exact
    ‖M‖²_F (float, summed in float64 in the first pass); ``sketch_S`` every singular value of the
    projected matrix QᵀM (ℓ ≥ k of them; lower bounds of the true σᵢ); ``power_iters`` used;
    ``energy_fraction`` = Σ S² / ‖M‖²_F.
    """

    def __new__(cls, U, S, Vh, frob_sq, sketch_S, power_iters):
        obj = super().__new__(cls, (U, S, Vh))
        obj.frob_sq = float(frob_sq)
        obj.sketch_S = sketch_S
        obj.power_iters = int(power_iters)
        return obj

    U = property(lambda self: self[0])
    S = property(lambda self: self[1])
    Vh = property(lambda self: self[2])

    @property
    def rank(self) -> int:
        return int(self[1].numel())

    @property
    def energy_fraction(self) -> float:
        if self.frob_sq <= 0:
            return 1.0
        return float((self[1].double() ** 2).sum()) / self.frob_sq


def _as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputError(f"truncated_svd: {what} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise InputError(f"truncated_svd: {what} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise InputError(f"truncated_svd: {what} has dtype {x.dtype}; pass float32, float16, bfloat16 or float64")
    return x


class _Operator:
    """M = T − B (or M = T) seen only through products.

    A pair, or a single matrix that needs converting (float16 / bfloat16), makes its first pass
    through the fused ``delta_sketch`` of the table: conversion, subtraction, ‖M‖²_F and the
    product in one read, and with ``materialize`` the float32 M written once for the later
    passes, which are then plain GEMMs. A single matrix already in the compute dtype needs no
    conversion: every pass is a GEMM on the caller's matrix, and ‖M‖²_F is one more read
    (copying it into a huge-page scratch buffer, as this once did, cost more than that read and
    bought nothing: GEMMs of 4096² by 40 columns took 19.0 ms on the caller's 4 KiB pages and
    19.5 ms on the buffer, on one core of the reference VM)."""

    def __init__(self, T, B, device, impl, materialize):
        self.B = B
        self.materialize = materialize
        self.m, self.n = T.shape
        self.device = device
        self.cdtype = torch.float64 if T.dtype == torch.float64 else torch.float32
        self.impl = impl
        self._plain = B is None and T.dtype == self.cdtype
        if self._plain and 1 not in T.stride():  # BLAS reads row- or column-major, not strided views
            T = T.contiguous()
        self.T = T
        self.direct = False
        self.scratch = None

    def release(self) -> None:
        """Hand the materialised delta back to the pool (nothing returned aliases it)."""
        if self.scratch is not None:
            SCRATCH.give(self.scratch)
            self.T = self.scratch = None

    def apply(self, X=None, Y=None, out_yt=None):
        """(M @ X, Mᵀ @ Y, ‖M‖²_F); the norm on the first pass only (None after). ``out_yt``
        (l, n), if given, receives (Mᵀ Y)ᵀ, and the product returned is its transposed view."""
        if self.direct or self._plain:
            fro = None
            if not self.direct:
                fro, self.direct = _frob_sq(self.T), True
            return _gemm_x(self.T, X), _gemm_y(self.T, Y, out_yt), fro
        out = None
        if self.materialize:
            # Convert once, in the same fused pass as the first sketch; later passes are GEMMs.
            out = self.scratch = SCRATCH.take((self.m, self.n), self.cdtype, self.device)
        mx, my, fro = backends.call("delta_sketch", self.device.type, self.T, self.B, X, Y, out=out, force=self.impl)
        if out is not None:
            self.T, self.B, self.direct = out, None, True
        if out_yt is not None and my is not None:
            out_yt.copy_(my.T)
            my = out_yt.T
        return mx, my, fro

    def frob_sq(self) -> float:
        if self.direct:  # only after a first pass, which returned it: callers keep that value
            return _frob_sq(self.T)
        return self.apply()[2]


# The thin operand goes on the left: (Xᵀ Mᵀ)ᵀ and (Yᵀ M)ᵀ, returned as column-major views.
# MKL ran these 10-25 % faster than M @ X and Mᵀ @ Y (one core of the reference VM, 4096²,
# 40 columns: 20.3 vs 24.1 ms and 21.0 vs 27.6 ms; 88 columns: 37.2 vs 41.7, 36.9 vs 43.9),
# and the column-major results are the layout LAPACK's triangular solves want.
def _gemm_x(M, X):
    return None if X is None else (X.T @ M.T).T


def _gemm_y(M, Y, out=None):
    return None if Y is None else torch.mm(Y.T, M, out=out).T


_NORM_RUN = 8192  # contiguous elements per float32 partial sum of ‖M‖²_F


def _frob_sq(M) -> float:
    """‖M‖²_F in one read: the norms of runs of ≤ 8192 contiguous elements, computed in M's
    dtype, squared and summed in float64 (relative error ~1e-8 on 4096²). One float32
    ``vector_norm`` over all of M ran no faster and was off by 1.5e-3 there (each of its
    accumulators sums ~10⁶ squares); a float64 accumulation cost 35× more. That is still the
    fallback where float32 overflowed, so that only a real Inf or NaN reads as non-finite."""
    A = M if M.stride(-1) == 1 else M.T  # _Operator made M row- or column-major

    def norms(dtype=None):
        return torch.cat([torch.linalg.vector_norm(A[:, j:j + _NORM_RUN], dim=1, dtype=dtype)
                          for j in range(0, A.shape[1], _NORM_RUN)])

    s = float((norms().double() ** 2).sum())
    if not np.isfinite(s) and M.dtype != torch.float64:
        s = float((norms(torch.float64) ** 2).sum())
    return s


def _orth(Y):
    return backends.call("orthonormalize", Y.device.type, Y)


def _auto_depth(k: int, small: int, method: str) -> int:
    if method == "subspace":
        return _auto_iters(k, small)
    # One block-Krylov step keeps MΩ and (MMᵀ)MΩ: with the default block k + 24 it measured
    # more accurate than 2 subspace iterations at block k + 10 for k = 2…64 on 4096-wide
    # matrices (benchmarks/bench_svd.py), in 4 passes instead of 6.
    return 1


def _auto_iters(k: int, small: int) -> int:
    # Error factor of subspace iteration ~ (min(m,n)/k)^(1/(2q+1)) (Halko et al. 2011, §10.4):
    # a small rank relative to the matrix needs more iterations to separate σ_k from the tail.
    # 3 for very small ranks of big matrices (k < 1% of min(m, n)), else 2: measured enough for
    # the accuracy contract below on decaying and sqrt-flat spectra.
    return 3 if k < 0.01 * small else 2


def _block_width(want: int, small: int) -> int:
    # GEMM kernels run measurably faster on widths that are multiples of 8 (oneDNN/MKL and
    # cuBLAS tile by 8 or 16: 4096²·26 columns took 12.1 ms, ·32 columns 10.6 ms on the
    # 2-core CPU); the extra directions only enlarge the search space.
    return min(-(-want // 8) * 8, small)


def _new_directions(Qprev, K):
    """Orthonormal basis of the part of span(K) orthogonal to span(Qprev), or None if K adds
    nothing. Directions whose share outside span(Qprev) is below ~1e3·eps are dropped: they
    are rounding noise (a Krylov space that has become invariant, e.g. for a rank-deficient M),
    and normalising them would produce vectors that are not orthogonal to Qprev."""
    tiny = _TINY[K.dtype]
    K = K / K.abs().amax(dim=0).clamp_min(tiny)  # first to O(1): the norm's squares stay finite
    K = K / torch.linalg.vector_norm(K, dim=0).clamp_min(tiny)
    for _ in range(2):  # classical Gram-Schmidt twice ("twice is enough", Giraud et al. 2005)
        K = torch.addmm(K, Qprev, Qprev.T @ K, alpha=-1)
    # Usually every column keeps a clear share outside span(Qprev) and K is well conditioned
    # (CholeskyQR2's check passes): orthonormalise it directly and project once more, which
    # skips the float64 Gram and its eigendecomposition (2048 × 88: 4.5 → 2 ms). Columns that
    # are (nearly) rounding noise, as in an invariant Krylov space, or a residual overlap with
    # Qprev that R⁻¹ amplified past _OVERLAP, leave the decision to the rank-revealing path.
    if float(torch.linalg.vector_norm(K, dim=0).min()) >= _DIRECT_SHARE:
        Q = cholqr2(K)
        if Q is not None:
            C = Qprev.T @ Q
            if float(C.abs().max()) <= _OVERLAP:
                return torch.addmm(Q, Qprev, C, alpha=-1)
    # The Gram matrix in float64: in float32 its null eigenvalues come out at ~eps·‖K‖², far
    # above the threshold; in float64 they sit at the rounding noise of K itself.
    Kd = K.double()
    lam, V = torch.linalg.eigh(Kd.T @ Kd)
    keep = lam > (1e3 * torch.finfo(K.dtype).eps) ** 2
    if not bool(keep.any()):
        return None
    N = K @ (V[:, keep] / lam[keep].sqrt()).to(K.dtype)
    N = torch.addmm(N, Qprev, Qprev.T @ N, alpha=-1)
    # N is already orthonormal to ~eps·√(λmax/λmin) ≤ √l·1e-3 over the kept λ (unit columns:
    # λmax ≤ l), so one Cholesky QR sweep (error ~eps·cond(N)²) finishes it where CholeskyQR2
    # would spend a second sweep (4096 × 88: 12.3 instead of 15.4 ms for this function).
    Q = cholqr(N)
    return Q if Q is not None else _orth(N)


_TINY = {dt: torch.finfo(dt).tiny for dt in (torch.float32, torch.float64)}
#: smallest share of a (unit) column outside span(Qprev) for the direct CholeskyQR2 of a new
#: Krylov block: 100x the rank-revealing path's cut (1e3·eps), so it never keeps noise there
_DIRECT_SHARE = 1e-2
#: largest |Qprevᵀ Q| entry that one more projection may remove from that direct result: it
#: changes Q's column norms by about its square (1e-8)
_OVERLAP = 1e-4


def _subspace(op, omega, k, q):
    """Randomized subspace iteration (Halko et al. 2011, Alg. 4.4): 2q + 2 passes of ℓ columns."""
    Y, _, fro = op.apply(X=omega)
    fro = op.frob_sq() if fro is None else fro
    _check_finite(fro)
    Q = _orth(Y)
    for _ in range(q):
        Z = _orth(op.apply(Y=Q)[1])
        Q = _orth(op.apply(X=Z)[0])
    Z = op.apply(Y=Q)[1]
    return (*_small_svd(Q, Z, k), fro)


def _krylov(op, omega, k, q):
    """Randomized block Krylov iteration (Musco & Musco 2015, Alg. 2) in block-Lanczos form.

    The basis is Q = [Q₀ … Q_q] with span = span[MΩ, (MMᵀ)MΩ, …, (MMᵀ)^q MΩ], each block
    orthogonalised against the previous ones. Every Wᵢ = MᵀQᵢ is kept, so QᵀM = [W₀ … W_q]ᵀ is
    known without a final pass over M: 2q + 2 passes of ℓ columns, exactly as many as subspace
    iteration with the same ℓ and q, whose subspace (MMᵀ)^q MΩ lies inside this one. Rayleigh–
    Ritz on a larger subspace can only raise each Ritz value towards σᵢ and lower the rank-k
    residual, so for the same Ω the result is never less accurate (in exact arithmetic)."""
    Y, _, fro = op.apply(X=omega)
    fro = op.frob_sq() if fro is None else fro
    _check_finite(fro)
    # The blocks are stored as rows of Qt and Wt, so Q = Qt.T and W = Wt.T are column-major
    # views: the GEMMs return column-major blocks, and concatenating those (torch.cat) cost
    # 20× a row copy (2.6 vs 0.12 ms for two 4096 × 88 blocks).
    Q0 = _orth(Y)
    ell = Q0.shape[1]
    Qt = torch.empty((q + 1) * ell, op.m, dtype=Q0.dtype, device=Q0.device)
    Wt = torch.empty((q + 1) * ell, op.n, dtype=Q0.dtype, device=Q0.device)
    Qt[:ell] = Q0.T
    lo, hi = 0, ell  # rows of the newest block
    for i in range(q + 1):
        op.apply(Y=Qt[lo:hi].T, out_yt=Wt[lo:hi])
        if i == q:
            break
        # W ~ σ₁ and M W ~ σ₁²: scaling W's columns (same span) keeps that product finite for
        # matrices whose σ₁² exceeds float32's range
        W = Wt[lo:hi].T
        Qn = _new_directions(Qt[:hi].T, op.apply(X=W / W.abs().amax(dim=0).clamp_min(_TINY[W.dtype]))[0])
        if Qn is None:  # the Krylov space is invariant: M has no further directions to give
            break
        lo, hi = hi, hi + Qn.shape[1]
        Qt[lo:hi] = Qn.T
    return (*_small_svd(Qt[:hi].T, Wt[:hi].T, k), fro)


# method → (algorithm, default oversample); the one list of the fixed-rank algorithms
_METHODS = {"krylov": (_krylov, 24), "subspace": (_subspace, 10)}
SVD_METHODS = tuple(_METHODS)


def _small_svd(Q, Z, k):
    """Given Q (m, l) orthonormal and Z = MᵀQ (n, l): SVD of QᵀM = Zᵀ through a QR of Z,
    so that the exact SVD runs on an l × l matrix instead of l × n.

    Z = Qz R by CholeskyQR2 (Householder where Z is too ill-conditioned for it), and Zᵀ = Rᵀ Qzᵀ
    = u s (vh Qzᵀ). Qz is never formed: with Qz = Q1 R2⁻¹, Vh = vh Qzᵀ = (R2⁻¹ vhᵀ)ᵀ Q1ᵀ, which
    saves an n × l triangular solve and the n × l × l product Qzᵀ Z."""
    f = cholqr2_factors(Z)
    if f is not None:
        Q1, R2, R = f
        u, s, vh = torch.linalg.svd(R.T)
        Vh = torch.linalg.solve_triangular(R2, vh[:k].T, upper=True).T @ Q1.T
    else:
        Qz, R = torch.linalg.qr(Z, mode="reduced")
        u, s, vh = torch.linalg.svd(R.T)
        Vh = vh[:k] @ Qz.T
    return Q @ u[:, :k], s[:k].clone(), Vh, s


@torch.no_grad()
def truncated_svd(
    M: Matrix | Sequence[Matrix],
    rank: int | None = None,
    *,
    oversample: int | None = None,
    power_iters: int | str = "auto",
    energy: float | None = None,
    tol: float | None = None,
    max_rank: int | None = None,
    block_size: int = 16,
    seed: int = 0,
    device: str | torch.device | None = None,
    impl: str | None = None,
    materialize: bool | str = "auto",
    method: str = "krylov",
) -> SVDResult:
    r"""Top singular triplets of ``M`` — or of ``tuned − base`` — by randomized block Krylov iteration.

    Two algorithms, both ending in an exact SVD of the small projected matrix:

    * ``method="krylov"`` (default): randomized block Krylov iteration (Musco & Musco,
      *Randomized block Krylov methods for stronger and faster approximate SVD*, NeurIPS 2015,
      Alg. 2) in block-Lanczos form: the basis spans MΩ, (MMᵀ)MΩ, …, (MMᵀ)^q MΩ, each block
      orthogonalised against the earlier ones, and every MᵀQᵢ is kept so that the projection
      needs no extra pass. Its error depends on the spectral gap like √gap where subspace
      iteration depends on the gap itself, so one step (4 passes) does the work of two or
      three subspace iterations (6–8 passes).
    * ``method="subspace"``: the randomized range finder with power iterations of Halko,
      Martinsson & Tropp, *Finding structure with randomness*, SIAM Review 53(2), 2011
      (Algorithms 4.4 and 5.1) — what ``torch.svd_lowrank`` and sklearn run.

    Bases are re-orthonormalised with CholeskyQR2 (Householder fallback). For the same Ω, ℓ and
    q the Krylov basis contains the subspace-iteration basis, so its σᵢ and its rank-k residual
    are never worse (Rayleigh–Ritz on a larger subspace), at the same number of passes. The
    fixed-precision mode (``energy``/``tol``) is the blocked adaptive range finder (Halko §4.4;
    Martinsson & Voronin 2016, randQB): blocks of ``block_size`` directions are added until the
    captured energy reaches the target.

    Args:
        M: a 2-D tensor / array, or a pair ``(tuned, base)`` of equal shape. For a pair the
            delta is never formed in full unless ``materialize`` says so: every pass reads
            both inputs in cache-sized row tiles, converting float16 / bfloat16 on the fly
            (``delta_sketch`` op), and the first pass also returns the exact ‖tuned − base‖²_F.
        rank: number of components ``k`` (1 ≤ k ≤ min(m, n)). Optional when ``energy`` or
            ``tol`` is given (it then caps the rank, like ``max_rank``).
        oversample: extra random directions ``p``; the block has ℓ = k + p columns, rounded up
            to a multiple of 8 (GEMMs run faster on such widths) and capped at min(m, n).
            Default (None): 24 for ``"krylov"`` (its single step leans on the block width),
            10 for ``"subspace"``.
        power_iters: ``q``: Krylov steps or power iterations; each costs two passes over the
            data. ``"auto"``: 1 Krylov step; subspace 3 iterations when k < 1% of
            min(m, n), else 2. Raise it when individual σᵢ of a flat
            spectrum matter; 0 suits fast-decaying spectra when speed matters.
        energy: fixed-precision mode — return the smallest rank whose Σσᵢ² reaches this
            fraction (0, 1] of the true ‖M‖²_F.
        tol: alternative to ``energy``: residual ‖M − U S Vh‖_F ≤ tol·‖M‖_F (energy = 1 − tol²).
        max_rank: rank cap in fixed-precision mode (default min(m, n)).
        block_size: directions added per step in fixed-precision mode.
        seed: seed of the Gaussian test matrix (drawn on the CPU, so results match across devices).
        device: where to compute (default: the device of ``M``); inputs are moved there.
        impl: force an implementation of ``delta_sketch`` (``"cpp"``, ``"cuda"``, ``"torch"``);
            a single float32 / float64 matrix makes no ``delta_sketch`` pass.
        materialize: ``False`` streams every pass from the inputs, so the float32 delta never
            exists; ``True`` writes it once during the first fused pass and runs later passes
            as plain GEMMs; ``"auto"`` (default) does the latter when the float32 delta fits in
            512 MiB (4096 × 11008 does). On Linux the CPU buffer is backed by transparent huge
            pages (:mod:`aios_fast._alloc`): first-touching it in 4 KiB pages cost more than
            re-converting the tiles on every pass. It is kept for the next call of the same
            shape (up to 256 MiB in all; :func:`free_scratch` frees it). A single matrix already in float32 / float64
            is never copied, whatever this says: every pass multiplies it where it lies.
        method: ``"krylov"`` (default) or ``"subspace"``, see above; it chooses the
            fixed-rank algorithm (the fixed-precision mode always grows its basis by blocks).

    Returns:
        :class:`SVDResult` ``(U, S, Vh)`` in float32 (float64 for float64 input), plus
        ``frob_sq``, ``sketch_S``, ``energy_fraction``.

    Accuracy contract (tested against LAPACK ``numpy.linalg.svd`` in tests/test_svd.py, for
    both methods with their defaults):
        * fast-decaying spectra (σᵢ ∝ 0.8^i or faster): relative error of each returned σᵢ
          ≤ 1e-3, and ‖M − U S Vh‖_F ≤ (1 + 1e-3)·the optimal rank-k error;
        * flat or slowly decaying spectra (σᵢ ∝ i^-0.5, random Gaussian): reconstruction error
          ≤ (1 + 0.05)·optimal (individual σᵢ may be low by a few percent; raise
          ``power_iters`` if they matter);
        * rank-deficient M of rank r < k: the r nonzero σᵢ to 1e-4 relative, the others ≤ 1e-5·σ₁;
        * float16 / bfloat16 inputs are decoded exactly and computed in float32: the same
          bounds hold relative to the SVD of the decoded matrix;
        * U and Vh have orthonormal rows/columns to 1e-5 (float32).
        A rank larger than min(m, n) raises InputError.
    """
    pair = isinstance(M, (tuple, list))
    if pair:
        if len(M) != 2:
            raise InputError(f"truncated_svd: a pair must be (tuned, base), got {len(M)} items")
        T, B = _as_tensor(M[0], "tuned"), _as_tensor(M[1], "base")
        if T.shape != B.shape:
            raise InputError(f"truncated_svd: tuned {tuple(T.shape)} and base {tuple(B.shape)} differ in shape")
        if T.dtype != B.dtype:  # mixed precision: compute in the wider type (one materialised copy each)
            wide = torch.float64 if torch.float64 in (T.dtype, B.dtype) else torch.float32
            T, B = T.to(wide), B.to(wide)
    else:
        T, B = _as_tensor(M, "M"), None
    m, n = T.shape
    small = min(m, n)
    if small == 0:
        raise InputError(f"truncated_svd: empty matrix of shape {(m, n)}")
    if tol is not None:
        if not 0.0 < tol < 1.0:
            raise InputError(f"truncated_svd: tol must be in (0, 1), got {tol}")
        if energy is not None:
            raise InputError("truncated_svd: pass energy or tol, not both")
        energy = 1.0 - tol * tol
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InputError(f"truncated_svd: energy must be in (0, 1], got {energy}")
    if rank is None and energy is None:
        raise InputError("truncated_svd: pass rank=k, or energy=/tol= for the fixed-precision mode")
    cap = rank if rank is not None else (max_rank if max_rank is not None else small)
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        raise InputError(f"truncated_svd: rank must be a positive integer, got {cap!r}")
    if cap > small:
        raise InputError(f"truncated_svd: rank {cap} exceeds min(m, n) = {small} for a {m}×{n} matrix; "
                         f"a matrix has at most min(m, n) singular values — pass rank ≤ {small}")
    if method not in _METHODS:
        raise InputError(f"truncated_svd: method must be one of {', '.join(map(repr, SVD_METHODS))}, "
                         f"got {method!r}")
    run, default_oversample = _METHODS[method]
    if oversample is None:
        oversample = default_oversample
    if isinstance(oversample, bool) or not isinstance(oversample, (int, np.integer)) or oversample < 0:
        raise InputError(f"truncated_svd: oversample must be an integer ≥ 0, got {oversample!r}")
    if power_iters != "auto" and (not isinstance(power_iters, (int, np.integer)) or power_iters < 0):
        raise InputError(f"truncated_svd: power_iters must be 'auto' or an integer ≥ 0, got {power_iters!r}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise InputError(f"truncated_svd: block_size must be a positive integer, got {block_size!r}")

    dev = torch.device(device) if device is not None else T.device
    T = T.to(dev)
    B = B.to(dev) if B is not None else None
    if materialize not in ("auto", True, False):
        raise InputError(f"truncated_svd: materialize must be 'auto', True or False, got {materialize!r}")
    if materialize == "auto":
        materialize = 4 * m * n <= _MATERIALIZE_BYTES
    op = _Operator(T, B, dev, impl, bool(materialize))
    gen = torch.Generator().manual_seed(int(seed))
    cd = op.cdtype
    try:
        if energy is None:
            k = int(cap)
            q = _auto_depth(k, small, method) if power_iters == "auto" else int(power_iters)
            ell = _block_width(k + int(oversample), small)
            omega = torch.randn(n, ell, generator=gen, dtype=cd).to(dev)
            U, S, Vh, s_all, fro = run(op, omega, k, q)
            return SVDResult(U, S, Vh, fro, s_all, q)
        return _adaptive(op, gen, energy, int(cap), power_iters, int(block_size), dev)
    finally:
        op.release()


def free_scratch() -> int:
    """Free the float32 deltas that :func:`truncated_svd` keeps for its next call of the same
    shape (at most 256 MiB; a batch extraction reuses one per module shape instead of faulting a
    fresh one in every call). Returns the bytes freed."""
    freed = SCRATCH.kept_bytes
    SCRATCH.clear()
    return freed


def _check_finite(fro: float) -> None:
    if not np.isfinite(fro):
        raise InputError("truncated_svd: the matrix contains NaN or Inf (‖M‖²_F is not finite)")


def _adaptive(op: _Operator, gen, energy, cap, power_iters, block, dev) -> SVDResult:
    m, n, cd = op.m, op.n, op.cdtype
    fro = op.frob_sq()
    _check_finite(fro)
    q = _auto_iters(min(block, cap), min(m, n)) if power_iters == "auto" else int(power_iters)
    if fro == 0.0:
        z = torch.zeros
        return SVDResult(z(m, 0, dtype=cd, device=dev), z(0, dtype=cd, device=dev),
                         z(0, n, dtype=cd, device=dev), 0.0, z(0, dtype=cd, device=dev), q)
    target = energy * fro
    Q = torch.zeros(m, 0, dtype=cd, device=dev)
    Zall = torch.zeros(n, 0, dtype=cd, device=dev)

    def proj(Y):
        return Y - Q @ (Q.T @ Y) if Q.shape[1] else Y

    captured = 0.0
    # Grow until the subspace holds the target energy (plus a block of slack so the rank
    # choice below is made on accurate leading σᵢ), or the cap is reached.
    while Q.shape[1] < min(m, n):
        b = min(block, min(m, n) - Q.shape[1])
        omega = torch.randn(n, b, generator=gen, dtype=cd).to(dev)
        Y = proj(op.apply(X=omega)[0])
        for _ in range(q):
            Z = _orth(op.apply(Y=_orth(Y))[1])
            Y = proj(op.apply(X=Z)[0])
        Qb = _orth(proj(_orth(Y)))  # projecting twice: classical Gram-Schmidt needs it
        Zb = op.apply(Y=Qb)[1]
        Q = torch.cat([Q, Qb], 1)
        Zall = torch.cat([Zall, Zb], 1)
        captured += float(torch.linalg.vector_norm(Zb, dtype=torch.float64) ** 2)
        if captured >= target or Q.shape[1] >= cap + block or fro - captured <= 1e-12 * fro:
            break
    U, S, Vh, s_all = _small_svd(Q, Zall, Q.shape[1])
    cum = torch.cumsum(S.double() ** 2, 0)
    hit = torch.nonzero(cum >= target * (1 - 1e-9))
    k = int(hit[0]) + 1 if hit.numel() else int(S.numel())
    k = max(1, min(k, cap))
    return SVDResult(U[:, :k].contiguous(), S[:k].clone(), Vh[:k].contiguous(), fro, s_all, q)
