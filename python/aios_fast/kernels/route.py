"""Operation ``route_topk``: the exact top-K skills for already-encoded queries.

Each skill owns a contiguous run of rows of an ``(N, d)`` float32 matrix of L2-normalised example
embeddings; its score for a query is the mean of its best ``min(kex, count)`` example cosine
similarities (the router's nearest-neighbour vote). The operation returns, per query, the ``K``
best skills and their scores, best first.

Implementations: ``cpp`` (an int8 scan of a quantised copy of the examples, a quarter of the
bytes a float32 pass reads, with a certified error bound that picks the few skills rescored
exactly in float32, so the answer is the float32 answer; AVX2 where the CPU has it) and
``numpy`` (one matrix product, per-skill partition; the reference). Build the inputs once per
routing index with :class:`RouteMatrix`; the registered functions trust it.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from .. import _native, backends
from ..errors import InputError

__all__ = ["RouteMatrix", "route_topk", "skill_scores", "top_k_rows", "TOLERANCE"]

#: exact scores agree with the reference to float32 summation-order differences
TOLERANCE = {"rtol": 1e-5, "atol": 2e-6}
_PAD = 32   # int8 rows padded to a multiple of the SIMD width


class RouteMatrix:
    """The example matrix of a routing index, with what the ``cpp`` scan needs precomputed.

    Args:
        E: ``(N, d)`` float32 example embeddings, rows grouped by skill.
        counts: ``(S,)`` examples per skill (all >= 1), in row order.
        quantize: build the int8 copy (4 bytes of float32 become 1 byte plus 12 per row).
    """

    __slots__ = ("E", "counts", "offsets", "S", "N", "d", "dp", "Eq", "scale", "norm", "resid", "pos", "L",
                 "uniform", "native_args")

    def __init__(self, E: np.ndarray, counts: np.ndarray, quantize: bool = True) -> None:
        E = np.ascontiguousarray(E, dtype=np.float32)
        counts = np.ascontiguousarray(counts, dtype=np.int64)
        if E.ndim != 2 or E.shape[1] < 1:
            raise InputError(f"route matrix: embeddings must be (N, d) with d >= 1, got {E.shape}")
        if counts.ndim != 1 or len(counts) < 1 or (counts < 1).any() or int(counts.sum()) != E.shape[0]:
            raise InputError(f"route matrix: counts must be >= 1 per skill and sum to N={E.shape[0]}")
        if not np.isfinite(E).all():
            raise InputError("route matrix: embeddings contain NaN or infinity")
        self.E, self.counts = E, counts
        self.S, self.N, self.d = len(counts), E.shape[0], E.shape[1]
        self.offsets = np.ascontiguousarray(np.r_[0, np.cumsum(counts)], dtype=np.int64)
        self.L = int(counts.max())
        self.uniform = bool((counts == self.L).all())
        owner = np.repeat(np.arange(self.S), counts)
        self.pos = owner * self.L + (np.arange(self.N) - self.offsets[:-1][owner])
        self.dp = -(-self.d // _PAD) * _PAD
        self.Eq = self.scale = self.norm = self.resid = None
        if quantize:
            amax = np.abs(E).max(1)
            scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.rint(E / scale[:, None]), -127, 127)
            Eq = np.zeros((self.N, self.dp), np.int8)
            Eq[:, :self.d] = q
            self.Eq, self.scale = Eq, scale
            self.norm = np.linalg.norm(E.astype(np.float64), axis=1).astype(np.float32)
            # float64 so the bound is not itself off by float32 rounding
            err = E.astype(np.float64) - q * scale[:, None].astype(np.float64)
            self.resid = np.linalg.norm(err, axis=1).astype(np.float32)
        # addresses for the compiled scan, taken once (``ndarray.ctypes`` costs ~1 us a call);
        # the arrays live as long as this object, which the caller holds during a call
        ptr = lambda a: 0 if a is None else a.ctypes.data  # noqa: E731
        self.native_args = (ptr(self.E), ptr(self.Eq), ptr(self.scale), ptr(self.norm), ptr(self.resid),
                            ptr(self.offsets), self.S, self.N, self.d, self.dp)


def _check(M: RouteMatrix, Q: np.ndarray, kex: int, K: int) -> None:
    if not isinstance(M, RouteMatrix):
        raise InputError(f"route_topk takes a RouteMatrix, got {type(M).__name__}")
    if Q.dtype != np.float32 or Q.ndim != 2 or Q.shape[1] != M.d or not Q.flags.c_contiguous:
        raise InputError(f"queries must be a C-contiguous float32 (n, {M.d}) array, got "
                         f"{Q.dtype} {Q.shape}")
    if not 1 <= kex <= 64:
        raise InputError(f"kex must be in [1, 64], got {kex}")
    if not 1 <= K <= M.S:
        raise InputError(f"K must be in [1, {M.S}] (the number of skills), got {K}")


def route_topk(M: RouteMatrix, Q: np.ndarray, kex: int, K: int, force: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, scores)``, each ``(n, K)``: per query the K best skills (row-group index) and
    their exact scores, best first. ``Q`` holds finite float32 rows of width ``d``."""
    Q = np.asarray(Q)
    _check(M, Q, kex, K)   # non-finite rows are refused by every implementation
    impl, _ = backends.choose("route_topk", "cpu", force=force)
    return impl.fn(M, Q, kex, K)


backends.define(
    "route_topk",
    "Exact top-K skills per query by the mean of each skill's best kex example similarities "
    "(rows grouped by skill).",
    cases=lambda: _cases(), compare=lambda g, e, c: _compare(g, e, c))


def _cpp_available() -> tuple[bool, str]:
    if _native.has("route_topk_cpu"):
        return True, "compiled into aios_fast._C"
    return False, "aios_fast._C lacks route_topk_cpu (build failed or too old; reinstall)"


@backends.register("route_topk", "numpy", devices=("*",), priority=100, reference=True,
                   why="reference: one float32 matrix product and a per-skill partition")
def _route_numpy(M: RouteMatrix, Q: np.ndarray, kex: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    finite = np.isfinite(Q).all(1)
    if not finite.all():   # worded as the cpp implementation's refusal
        raise InputError(f"queries: query row {int(np.argmin(finite))} contains NaN or infinity")
    return top_k_rows(skill_scores(M, Q, kex), K)


def top_k_rows(scores: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, values)``, each ``(n, K)``: the K largest of each row of ``(n, S)`` ``scores``,
    best first; equal scores: lower column first (as the cpp implementation)."""
    n, S = scores.shape
    rows = np.arange(n)[:, None]
    ids = np.argpartition(-scores, K - 1, axis=1)[:, :K] if S > K else np.tile(np.arange(S), (n, 1))
    vals = scores[rows, ids]
    order = np.lexsort((ids, -vals), axis=1)
    return ids[rows, order].astype(np.int64), vals[rows, order]


@backends.register("route_topk", "cpp", devices=("cpu",), priority=20,
                   why="int8 scan (a quarter of the bytes) with a certified bound and exact float32 "
                       "rescoring of the few skills it cannot rule out (benchmarks/bench_router.py)",
                   available=_cpp_available)
def _route_cpp(M: RouteMatrix, Q: np.ndarray, kex: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        return _native.native().route_topk_cpu(*M.native_args, Q, kex, K)
    except ValueError as exc:   # the kernel refuses non-finite queries
        raise InputError(f"queries: {exc}".replace("route_topk_cpu: ", "")) from None


def skill_scores(M: RouteMatrix, Q: np.ndarray, kex: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """``(n, S)`` mean of each skill's best ``min(kex, count)`` similarities (float32).
    ``exclude``: per query one example row to leave out (leave-one-out calibration); a skill
    left with no example scores 0."""
    n, S, L = Q.shape[0], M.S, M.L
    sims = Q @ M.E.T                                     # (n, N): the one matrix product
    k = min(kex, L)
    if exclude is None and M.uniform:
        P = sims.reshape(n, S, L)
        if k < L:
            P = np.partition(P, L - k, axis=2)[:, :, L - k:]
        return P.mean(2, dtype=np.float32)
    if exclude is not None:
        sims[np.arange(n), exclude] = -np.inf
    P = np.full((n, S * L), -np.inf, np.float32)
    P[:, M.pos] = sims
    P = P.reshape(n, S, L)
    if k < L:
        P = np.partition(P, L - k, axis=2)[:, :, L - k:]
    valid = np.isfinite(P)
    total = np.where(valid, P, 0.0).sum(2)
    return (total / np.maximum(valid.sum(2), 1)).astype(np.float32)


# --------------------------------------------------------------------------- contract

def _cases() -> Iterator[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    rng = np.random.default_rng(7)

    def unit(n, d):
        X = rng.normal(size=(n, d)).astype(np.float32)
        return X / np.linalg.norm(X, axis=1, keepdims=True)

    for S, per, d, kex, K, n in [(1, 1, 8, 3, 1, 2), (2, 3, 16, 3, 2, 3), (10, 10, 384, 3, 3, 4),
                                 (300, 10, 384, 3, 3, 5), (200, 7, 385, 2, 5, 3), (64, 64, 64, 64, 4, 2)]:
        E = unit(S * per, d)
        M = RouteMatrix(E, np.full(S, per))
        Q = np.ascontiguousarray(E[rng.integers(0, S * per, n)] + 0.02 * unit(n, d))
        yield f"S{S}-per{per}-d{d}-kex{kex}-K{K}", (M, Q, kex, K), {}
    # ragged skills, near-ties between planted skills, and a zero query
    counts = rng.integers(1, 12, size=400)
    E = unit(int(counts.sum()), 96)
    M = RouteMatrix(E, counts)
    Q = np.vstack([E[5], E[5] * 0.999 + E[6] * 0.001, np.zeros(96, np.float32)])
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    yield "ragged-S400-d96", (M, Q, 3, 4), {}


def _compare(got: tuple[np.ndarray, np.ndarray], expected: tuple[np.ndarray, np.ndarray], case_id: str) -> None:
    gi, gv = got
    ei, ev = expected
    assert gi.shape == ei.shape and gv.shape == ev.shape, f"{case_id}: shapes {gi.shape} vs {ei.shape}"
    np.testing.assert_allclose(gv, ev, err_msg=case_id, **TOLERANCE)
    # ids may differ only where scores tie within the tolerance
    differ = gi != ei
    if differ.any():
        np.testing.assert_allclose(gv[differ], ev[differ], err_msg=f"{case_id}: ids differ beyond a tie",
                                   **TOLERANCE)
