"""Randomized truncated SVD of checkpoint deltas: aios_fast.truncated_svd against its peers.

Cases: float32 and bfloat16 (tuned, base) pairs of 4096×4096 and 4096×11008 (a Llama-7B
attention / MLP matrix), rank 16 and 64. Every method starts from the two checkpoints, so the
peers' timings include forming the float32 delta (what a whole-checkpoint extraction has to do):

* ``ours``      ``truncated_svd((tuned, base), k)`` with its defaults: block Krylov, one step
  (4 passes), block k + 24 rounded up to a multiple of 8, fused convert/subtract/sketch;
* ``ours-pq``   the same with the peers' settings, ``oversample=10, power_iters=2`` (6 passes):
  its basis contains theirs, so it is never less accurate;
* ``lowrank``   ``torch.svd_lowrank(tuned.float() - base.float(), q=k+10, niter=2)``;
* ``sklearn``   ``sklearn.utils.extmath.randomized_svd(..., n_oversamples=10, n_iter=2)``;
* ``full``      ``torch.linalg.svd`` (what mergekit's extract-lora runs per module), on
  4096×4096 float32 only and one round: on a 2-core VM it takes tens of seconds, and on
  4096×11008 minutes.

Single matrices (PiSSA initialisation, compression: ``truncated_svd(M, k)``): the delta of the
4096×4096 pair formed once and stored as float32 / bfloat16 (a decaying spectrum over a noise
floor), rank 16 and 64, ``ours`` against ``lowrank`` (``torch.svd_lowrank(M.float(), ...)``).
(On a flat spectrum, e.g. a Gaussian matrix, σ_k of every randomized method is off by 10 % or
more at these settings: the reconstruction error, not σ_k, is the measure there.)

Error: σ_k relative error against LAPACK (``torch.linalg.svdvals`` in float64 of the float32
delta or matrix; every case fits in memory), as the median and maximum over 5 random starts
(seeds 0-4; ``torch.manual_seed`` for svd_lowrank), computed outside the timed rounds: one draw
says little, the spread between draws is wide. Each ``lowrank`` case asserts that ``ours`` has
an equal or lower median and maximum error; both are computed in that case (seeded, cached),
so the assertion holds whatever order or subset of the cases runs.
Time: the minimum of 5 rounds after a warm-up. At the end the ratios to ``lowrank`` are
printed (run with ``-s``) and the comparison figure is written to docs/img/svd_bench.png.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from aios_fast._atomic import save_figure
from aios_fast.bench.cases import svd as case  # the pair and the methods, shared with `aios-fast bench --only svd`
from aios_fast.linalg import truncated_svd

SHAPES = [(4096, 4096), (4096, 11008)]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
RANKS = [16, 64]
P, Q = 10, 2
SEEDS = range(5)
METHODS = ["ours", "ours-pq", "lowrank", "sklearn", "full"]
RESULTS: list[dict] = []
PNG = Path(__file__).resolve().parents[1] / "docs" / "img" / "svd_bench.png"

_cache: dict = {}


def pair(shape, dt):
    """(tuned, base, LAPACK σ of tuned − base) for the case."""
    key = (shape, dt)
    if key not in _cache:
        T, B = case.make_pair(shape, DTYPES[dt])  # planted spectrum 0.96^i over 256 directions + noise
        _cache[key] = (T, B, lapack_sv(T.float() - B.float()))
    return _cache[key]


def single(shape, dt):
    """(M, None, LAPACK σ of M): the pair's delta, formed once, in the case's dtype."""
    key = ("single", shape, dt)
    if key not in _cache:
        T, B, _ = pair(shape, dt)
        M = (T.float() - B.float()).to(DTYPES[dt])
        _cache[key] = (M, None, lapack_sv(M.float()))
    return _cache[key]


def lapack_sv(D: torch.Tensor) -> torch.Tensor:
    """Every singular value of ``D`` by LAPACK (gesdd through torch), in float64."""
    return torch.linalg.svdvals(D.double())


_errors: dict = {}


def errors(kind, shape, dt, k, method):
    """σ_k relative errors over SEEDS (cached: seeded, so order independent)."""
    key = (kind, shape, dt, k, method)
    if key not in _errors:
        T, B, ref = (pair if kind == "pair" else single)(shape, dt)
        fn = _method(method, k) if kind == "pair" else _single_method(method, k)
        _errors[key] = [float(abs(fn(T, B, seed).double()[k - 1] - ref[k - 1]) / ref[k - 1]) for seed in SEEDS]
    return _errors[key]


@pytest.fixture(scope="module", autouse=True)
def report_at_end():
    yield
    if RESULTS:
        _print_ratios(RESULTS)
        _plot(RESULTS)


def _method(name, k):
    """(seed → σ) for one method."""
    if name == "ours":
        return lambda T, B, seed=0: case.ours(T, B, k, seed)
    if name == "ours-pq":
        return lambda T, B, seed=0: truncated_svd((T, B), k, oversample=P, power_iters=Q, seed=seed).S

    if name == "lowrank":
        return lambda T, B, seed=0: case.lowrank(T, B, k, seed)
    if name == "sklearn":
        def skl(T, B, seed=0):
            from sklearn.utils.extmath import randomized_svd
            D = (T.float() - B.float()).numpy()
            return torch.from_numpy(randomized_svd(D, k, n_oversamples=P, n_iter=Q, random_state=seed)[1])
        return skl
    return lambda T, B, seed=0: case.full_svd(T, B, k)


def _single_method(name, k):
    if name == "ours":
        return lambda M, _=None, seed=0: truncated_svd(M, k, seed=seed).S

    def lowrank(M, _=None, seed=0):
        torch.manual_seed(seed)
        return torch.svd_lowrank(M.float(), q=k + P, niter=Q)[1]
    return lowrank


CASES = [pytest.param(shape, dt, k, meth, id=f"{shape[0]}x{shape[1]}-{dt}-r{k}-{meth}")
         for shape in SHAPES for dt in DTYPES for k in RANKS for meth in METHODS
         if meth != "full" or (shape == (4096, 4096) and dt == "f32" and k == 16)]


@pytest.mark.parametrize("shape,dt,k,method", CASES)
def test_truncated_svd(benchmark, shape, dt, k, method):
    T, B, ref = pair(shape, dt)
    fn = _method(method, k)
    benchmark.group = f"{shape[0]}x{shape[1]} {dt} rank {k}"
    full = method == "full"
    S = benchmark.pedantic(fn, args=(T, B), rounds=1 if full else 5, iterations=1, warmup_rounds=0 if full else 1)
    if full:
        # float32 LAPACK agrees with the float64 reference
        np.testing.assert_allclose(ref[:k].numpy(), S[:k].double().numpy(), rtol=1e-4)
        errs = [float(abs(S.double()[k - 1] - ref[k - 1]) / ref[k - 1])]
    else:
        errs = errors("pair", shape, dt, k, method)
    med, worst = float(np.median(errs)), max(errs)
    # ours is held to its accuracy contract; a peer only has to be a sane SVD
    assert worst < (2e-2 if method.startswith("ours") else 1e-1), f"{method}: σ_{k} relative error {worst:.2e}"
    t = benchmark.stats.stats.min
    benchmark.extra_info.update({"method": method, "sigma_r_rel_err_median": med, "sigma_r_rel_err_max": worst,
                                 "shape": list(shape), "dtype": dt, "rank": k, "min_s": t})
    case = f"{shape[0]}x{shape[1]}\n{dt} r{k}"
    RESULTS.append({"case": case, "method": method, "time": t, "err": med, "err_max": worst})
    if method == "lowrank":
        # the speed goal is stated at equal or better error: the errors are seeded, so this half
        # of it does not depend on the machine's noise (the times do), nor on the test order
        mine = errors("pair", shape, dt, k, "ours")
        assert np.median(mine) <= med and max(mine) <= worst, (mine, errs)


SINGLE_SHAPE = (4096, 4096)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("k", RANKS)
@pytest.mark.parametrize("method", ["ours", "lowrank"])
def test_truncated_svd_single_matrix(benchmark, dt, k, method):
    """``truncated_svd(M, k)`` on one matrix against ``torch.svd_lowrank`` (goal: ≤ 0.8× its
    time at equal or better σ_k error, as for pairs)."""
    M, _, ref = single(SINGLE_SHAPE, dt)
    fn = _single_method(method, k)
    benchmark.group = f"single {SINGLE_SHAPE[0]}x{SINGLE_SHAPE[1]} {dt} rank {k}"
    benchmark.pedantic(fn, args=(M,), rounds=5, iterations=1, warmup_rounds=1)
    errs = errors("single", SINGLE_SHAPE, dt, k, method)
    med, worst = float(np.median(errs)), max(errs)
    assert worst < (2e-2 if method == "ours" else 1e-1), f"{method}: σ_{k} relative error {worst:.2e}"
    t = benchmark.stats.stats.min
    benchmark.extra_info.update({"method": method, "sigma_r_rel_err_median": med, "sigma_r_rel_err_max": worst,
                                 "shape": list(SINGLE_SHAPE), "dtype": dt, "rank": k, "min_s": t, "single": True})
    RESULTS.append({"case": f"single {SINGLE_SHAPE[0]}x{SINGLE_SHAPE[1]}\n{dt} r{k}", "method": method,
                    "time": t, "err": med, "err_max": worst})
    if method == "lowrank":
        mine = errors("single", SINGLE_SHAPE, dt, k, "ours")
        assert np.median(mine) <= med and max(mine) <= worst, (mine, errs)


def _print_ratios(results):
    print("\ncase | method | min s | σ_k err median (max) | time / lowrank")
    for case in dict.fromkeys(r["case"] for r in results):
        rows = {r["method"]: r for r in results if r["case"] == case}
        peer = rows.get("lowrank")
        for meth in METHODS:
            if meth in rows:
                r = rows[meth]
                ratio = f"{r['time'] / peer['time']:.2f}" if peer else "-"
                print(f"{case.replace(chr(10), ' ')} | {meth} | {r['time']:.3f} | "
                      f"{r['err']:.1e} ({r['err_max']:.1e}) | {ratio}")


def _plot(results):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in results))
    methods = METHODS
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    w = 0.16
    for i, meth in enumerate(methods):
        xs, ts, es = [], [], []
        for j, c in enumerate(cases):
            hit = [r for r in results if r["case"] == c and r["method"] == meth]
            if hit:
                xs.append(j + (i - 2) * w)
                ts.append(hit[0]["time"])
                es.append(max(hit[0]["err"], 1e-9))
        if xs:
            ax.bar(xs, ts, w, label=meth)
            if meth != "full":  # the exact SVD is what the reference is checked against
                ax2.bar(xs, es, w, label=meth)
    for a, title, lab in ((ax, "time (min of rounds)", "seconds (log)"),
                          (ax2, "σ_k relative error (median of 5 starts)", "error (log)")):
        a.set_xticks(range(len(cases)))
        a.set_xticklabels(cases, fontsize=7)
        a.set_yscale("log")
        a.set_title(title)
        a.set_ylabel(lab)
    ax.legend()
    fig.suptitle("truncated SVD of tuned − base: ours (block Krylov, defaults) vs peers at oversample 10, "
                 "2 power iterations — 2-core shared VM")
    fig.tight_layout()
    save_figure(fig, PNG, dpi=110)


@pytest.mark.parametrize("impl", ["cpp", "numba", "torch"])
@pytest.mark.parametrize("dt", list(DTYPES))
def test_delta_sketch_pass(benchmark, impl, dt):
    """One fused pass (convert + subtract + ‖D‖² + D @ Ω) over a 4096×11008 pair: the compiled
    tile converter against the torch reference (both hand tiles to torch's GEMM)."""
    from aios_fast import _native, backends

    if impl == "cpp" and not _native.has("delta_tile"):
        pytest.skip("aios_fast._C has no delta_tile")
    ok, why = next(i for i in backends.implementations("delta_sketch", "cpu", only_available=False)
                   if i.name == impl).available()
    if not ok:
        pytest.skip(f"{impl}: {why}")
    T, B, _ = pair((4096, 11008), dt)
    X = torch.randn(11008, 26, generator=torch.Generator().manual_seed(1))
    benchmark.group = f"delta_sketch pass 4096x11008 {dt}"
    out = benchmark.pedantic(lambda: backends.call("delta_sketch", "cpu", T, B, X, None, force=impl),
                             rounds=3, iterations=1, warmup_rounds=1)
    D = T.float() - B.float()
    torch.testing.assert_close(out[0], D @ X, rtol=1e-4, atol=1e-3)
    assert out[2] == pytest.approx(float((D.double() ** 2).sum()), rel=1e-5)
    benchmark.extra_info.update({"method": f"sketch-{impl}", "sigma_r_rel_err": 0.0, "min_s": benchmark.stats.stats.min})
