"""The ``route_topk`` operation: the compiled int8 scan with its certified bound must return the
float32 answer (the NumPy reference's), including where the int8 error is larger than the gaps
between skills, and the router must give the same results through either implementation."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from aios_fast import _native
from aios_fast.errors import InputError
from aios_fast.kernels.route import RouteMatrix, route_topk

needs_cpp = pytest.mark.skipif(not _native.has("route_topk_cpu"), reason="aios_fast._C lacks route_topk_cpu")


def _unit(rng, n, d):
    X = rng.normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


class _NoEncoder:
    """Routing already-encoded queries needs no encoder; a call to one is a bug in the test."""

    model = None

    def encode(self, texts):  # pragma: no cover
        raise AssertionError("must not encode")


def _router(E, skills, per=10):
    from aios_fast.route.router import LoRARouter

    router = LoRARouter(_NoEncoder())
    router._fp = "test"
    router.add_skills([{"name": f"s{i}", "examples": [f"e{j}" for j in range(per)],
                        "embeddings": E[per * i:per * i + per]} for i in range(skills)])
    return router


def _same(got, ref, scores_atol=2e-6):
    gi, gv = got
    ri, rv = ref
    np.testing.assert_allclose(gv, rv, rtol=1e-5, atol=scores_atol)
    tie = np.isclose(gv, rv, rtol=1e-5, atol=scores_atol)
    assert ((gi == ri) | tie).all()


@needs_cpp
@pytest.mark.parametrize("seed", range(6))
def test_scan_equals_reference_on_random_indexes(seed):
    rng = np.random.default_rng(seed)
    S = int(rng.integers(20, 1500))
    counts = rng.integers(1, 16, size=S)
    d = int(rng.choice([64, 100, 384, 768]))
    E = _unit(rng, int(counts.sum()), d)
    M = RouteMatrix(E, counts)
    Q = np.ascontiguousarray(E[rng.integers(0, len(E), 8)] + 0.3 * _unit(rng, 8, d))
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    for kex, K in [(3, 2), (1, 5), (5, 3)]:
        _same(route_topk(M, Q, kex, K, force="cpp"), route_topk(M, Q, kex, K, force="numpy"))


@needs_cpp
def test_scan_is_exact_where_int8_error_exceeds_the_gaps():
    """1,000 skills whose examples are tiny perturbations of one direction: their scores differ by
    ~1e-4, less than the int8 error (~1e-3), so the bound must send many of them to exact
    rescoring and the ranking must still be the float32 one."""
    rng = np.random.default_rng(3)
    base = _unit(rng, 1, 384)[0]
    E = base + 3e-3 * _unit(rng, 10_000, 384)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    M = RouteMatrix(E.astype(np.float32), np.full(1000, 10))
    q = base + 1e-3 * _unit(rng, 1, 384)[0]
    Q = (q / np.linalg.norm(q))[None, :].astype(np.float32)
    ids, vals = route_topk(M, Q, 3, 5, force="cpp")
    rids, rvals = route_topk(M, Q, 3, 5, force="numpy")
    assert np.ptp(rvals) < 1e-3          # the regime this test is about: gaps below the int8 error
    _same((ids, vals), (rids, rvals))


@needs_cpp
def test_portable_path_without_avx2():
    code = ("import numpy as np\n"
            "from aios_fast.kernels.route import RouteMatrix, route_topk\n"
            "rng = np.random.default_rng(1)\n"
            "E = rng.normal(size=(3000, 200)).astype(np.float32)\n"
            "E /= np.linalg.norm(E, axis=1, keepdims=True)\n"
            "M = RouteMatrix(E, np.full(300, 10))\n"
            "Q = np.ascontiguousarray(E[[5, 700, 2999]] + 0.05)\n"
            "a = route_topk(M, Q, 3, 4, force='cpp'); b = route_topk(M, Q, 3, 4, force='numpy')\n"
            "assert (a[0] == b[0]).all(), (a, b)\n"
            "np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=2e-6)\n"
            "print('ok')\n")
    env = dict(os.environ, AIOS_FAST_NO_AVX2="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_quantised_copy_bounds_hold():
    rng = np.random.default_rng(0)
    E = _unit(rng, 500, 385)
    M = RouteMatrix(E, np.full(50, 10))
    assert M.Eq.shape == (500, 416) and not M.Eq[:, 385:].any()      # zero padding to 32
    back = M.Eq[:, :385].astype(np.float64) * M.scale[:, None]
    np.testing.assert_allclose(np.linalg.norm(E - back, axis=1), M.resid, rtol=1e-5, atol=1e-7)
    assert (M.resid < 0.02).all()                                     # int8 keeps ~2 % of a unit row
    np.testing.assert_allclose(M.norm, 1.0, atol=1e-5)


def test_bad_inputs_are_named():
    rng = np.random.default_rng(0)
    E = _unit(rng, 20, 8)
    with pytest.raises(InputError, match="sum to N=20"):
        RouteMatrix(E, np.full(3, 5))
    with pytest.raises(InputError, match="NaN or infinity"):
        RouteMatrix(np.full((2, 8), np.nan, np.float32), [1, 1])
    M = RouteMatrix(E, np.full(4, 5))
    with pytest.raises(InputError, match=r"float32 \(n, 8\)"):
        route_topk(M, np.zeros((1, 9), np.float32), 3, 2)
    with pytest.raises(InputError, match=r"K must be in \[1, 4\]"):
        route_topk(M, np.zeros((1, 8), np.float32), 3, 5)
    with pytest.raises(InputError, match="NaN"):
        route_topk(M, np.full((1, 8), np.inf, np.float32), 3, 2)


def test_router_refuses_non_finite_query_embeddings():
    """Through the scan (one query) and the matrix product (a batch) alike: a clear error, never
    an answer computed from NaN bounds."""
    rng = np.random.default_rng(2)
    E = _unit(rng, 3000, 64)
    router = _router(E, 300)
    bad = E[:20].copy()
    bad[3, 5] = np.nan
    with pytest.raises(InputError, match="row 0 contains NaN or infinity"):
        router.route_embeddings(bad[3])
    with pytest.raises(InputError, match="NaN or infinity"):
        router.route_embeddings(bad)
    assert router.route_embeddings(E[7])[0].top == "s0"


def test_router_answers_equal_through_either_implementation(monkeypatch):
    """The router's single-query path (the scan) and its batch path (one matrix product) give the
    same rankings, scores and confidences."""
    rng = np.random.default_rng(5)
    E = _unit(rng, 4000, 384)
    router = _router(E, 400)
    Q = E[::97] + 0.1 * _unit(rng, len(E[::97]), 384)
    Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    batch = router.route_embeddings(Q)                       # > 16 queries: matrix product
    one = [router.route_embeddings(q)[0] for q in Q]          # the scan
    for a, b in zip(one, batch):
        assert [n for n, _ in a.ranked] == [n for n, _ in b.ranked]
        np.testing.assert_allclose([s for _, s in a.ranked], [s for _, s in b.ranked], rtol=1e-5, atol=2e-6)
        assert abs(a.confidence - b.confidence) < 1e-5 and abs(a.margin - b.margin) < 1e-5
        assert a.skill == b.skill
