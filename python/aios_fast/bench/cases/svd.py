"""Benchmark group ``svd``: randomized truncated SVD, ``truncated_svd`` against ``torch.svd_lowrank``.

Shared by ``aios-fast bench --only svd`` (:func:`run`) and ``benchmarks/bench_svd.py`` (which
times the same methods with pytest-benchmark and adds sklearn and the peers' settings):

* pairs (extraction): ``truncated_svd((tuned, base), k)`` on a checkpoint delta. The pair is a
  planted spectrum (σᵢ = 0.96ⁱ over 256 directions) on top of a random base plus noise, in
  float32 and bfloat16. Every method starts from the two checkpoints, so the peers' times
  include forming the float32 delta. Once per run, also against the full ``torch.linalg.svd``
  that mergekit's extract-lora runs per module.
* single matrices (PiSSA initialisation, compression): ``truncated_svd(M, k)`` on the pair's
  delta formed once and stored as float32 / bfloat16, against ``torch.svd_lowrank(M.float())``.

The peer runs at oversample 10 and 2 power iterations (its usual settings). Goal: ≤ 0.8× its
time at equal or better error. Error: σ_k's relative error against LAPACK
(``torch.linalg.svdvals`` in float64 of the float32 delta or matrix) where that fits in memory,
else against a converged randomized reference (subspace iteration, 8 power iterations, 64
oversamples); as the median and maximum over several random starts (``seed`` for ours,
``torch.manual_seed`` for the peer), computed outside the timed rounds and seeded, so the
comparison does not depend on which cases ran before. Ours must stay under 2 % on every start
and have a median no higher than the peer's (both maxima are reported).
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch

from ..core import BenchContext, CaseFailed, Figure, Goal, measure

__all__ = ["make_pair", "make_single", "lapack_fits", "lapack_sigma", "reference_sigma", "ours", "lowrank",
           "ours_peer_settings", "sklearn_randomized", "full_svd", "ours_single", "lowrank_single",
           "PAIR_METHODS", "SINGLE_METHODS", "sigma_error", "error_summary", "seeded_errors", "check_sigma", "check_errors",
           "run", "OVERSAMPLE", "POWER_ITERS", "DTYPES", "LIMIT"]

OVERSAMPLE, POWER_ITERS = 10, 2  # the peers' settings
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
LIMIT = 2e-2  # ours' σ_k relative error contract


# ------------------------------------------------------------------ inputs and references
def make_pair(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(tuned, base) of ``shape`` in ``dtype``: base ~ 0.02·N(0,1), tuned = base + planted
    spectrum 0.96ⁱ (256 directions) + 1e-4 noise."""
    m, n = shape
    g = torch.Generator().manual_seed(seed)
    k = min(256, m, n)
    u = torch.randn(m, k, generator=g) / m ** 0.5
    v = torch.randn(n, k, generator=g) / n ** 0.5
    sig = 0.96 ** torch.arange(k, dtype=torch.float32)
    base = 0.02 * torch.randn(m, n, generator=g)
    tuned = base + (u * sig) @ v.T + 1e-4 * torch.randn(m, n, generator=g)
    return tuned.to(dtype), base.to(dtype)


def make_single(shape: tuple[int, int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """One matrix: the delta of :func:`make_pair`, formed once in float32 and stored in ``dtype``
    (a decaying spectrum over a noise floor; on a flat spectrum σ_k of every randomized method
    is off by 10 % or more at these settings)."""
    T, B = make_pair(shape, dtype, seed)
    return (T.float() - B.float()).to(dtype)


def lapack_fits(shape: tuple[int, int]) -> bool:
    """Whether LAPACK's float64 singular values of ``shape`` fit in half the available memory
    (the float64 copy plus gesdd's workspace: about three copies)."""
    need = 3 * 8 * shape[0] * shape[1]
    try:
        import psutil

        avail = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil ships with the bench extras
        import os

        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need <= avail // 2


def lapack_sigma(D: torch.Tensor) -> torch.Tensor:
    """Every singular value of ``D`` by LAPACK (gesdd through torch), in float64."""
    return torch.linalg.svdvals(D.double())


def reference_sigma(tuned: torch.Tensor, base: torch.Tensor | None, k: int) -> torch.Tensor:
    """σ₁..σ_k (at least) in float64 of ``tuned − base`` (or of ``tuned`` when ``base`` is None):
    LAPACK where it fits in memory, else converged subspace iteration (8 power iterations,
    64 oversamples)."""
    D = tuned.float() if base is None else tuned.float() - base.float()
    if lapack_fits(tuple(D.shape)):
        return lapack_sigma(D)
    from ...linalg import truncated_svd

    return truncated_svd(D, k, oversample=64, power_iters=8, method="subspace").S.double()


# ------------------------------------------------------------------ the methods: fn(T, B, k, seed) -> σ
def ours(tuned, base, k: int, seed: int = 0) -> torch.Tensor:
    """σ of ``truncated_svd((tuned, base), k)`` with its defaults (block Krylov, one step)."""
    from ...linalg import truncated_svd

    return truncated_svd((tuned, base), k, seed=seed).S


def ours_peer_settings(tuned, base, k: int, seed: int = 0) -> torch.Tensor:
    """Ours at the peers' settings (``oversample=10, power_iters=2``): its basis contains theirs."""
    from ...linalg import truncated_svd

    return truncated_svd((tuned, base), k, oversample=OVERSAMPLE, power_iters=POWER_ITERS, seed=seed).S


def lowrank(tuned, base, k: int, seed: int = 0) -> torch.Tensor:
    """σ of ``torch.svd_lowrank`` on the float32 delta, at oversample 10, 2 power iterations."""
    torch.manual_seed(seed)
    return torch.svd_lowrank(tuned.float() - base.float(), q=k + OVERSAMPLE, niter=POWER_ITERS)[1]


def sklearn_randomized(tuned, base, k: int, seed: int = 0) -> torch.Tensor:
    """σ of ``sklearn.utils.extmath.randomized_svd`` on the float32 delta, same settings."""
    from sklearn.utils.extmath import randomized_svd

    D = (tuned.float() - base.float()).numpy()
    return torch.from_numpy(randomized_svd(D, k, n_oversamples=OVERSAMPLE, n_iter=POWER_ITERS,
                                           random_state=seed)[1])


def full_svd(tuned, base, k: int, seed: int = 0) -> torch.Tensor:
    """σ₁..σ_k of the full ``torch.linalg.svd`` of the float32 delta (mergekit's method)."""
    return torch.linalg.svd(tuned.float() - base.float(), full_matrices=False)[1][:k]


def ours_single(M, _unused, k: int, seed: int = 0) -> torch.Tensor:
    """σ of ``truncated_svd(M, k)`` with its defaults."""
    from ...linalg import truncated_svd

    return truncated_svd(M, k, seed=seed).S


def lowrank_single(M, _unused, k: int, seed: int = 0) -> torch.Tensor:
    """σ of ``torch.svd_lowrank(M.float(), q=k+10, niter=2)``."""
    torch.manual_seed(seed)
    return torch.svd_lowrank(M.float(), q=k + OVERSAMPLE, niter=POWER_ITERS)[1]


PAIR_METHODS: dict[str, Callable[..., torch.Tensor]] = {
    "ours": ours, "ours-pq": ours_peer_settings, "lowrank": lowrank, "sklearn": sklearn_randomized,
    "full": full_svd}
SINGLE_METHODS: dict[str, Callable[..., torch.Tensor]] = {"ours": ours_single, "lowrank": lowrank_single}


# ------------------------------------------------------------------ checks
def sigma_error(sigma: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    """σ_k's relative error against the reference (``sigma`` on any device)."""
    return float(abs(sigma.detach().double().cpu()[k - 1] - ref[k - 1]) / ref[k - 1])


def error_summary(errors: Sequence[float]) -> dict[str, float]:
    """A figure's record of seeded σ_k errors: median, maximum, number of starts."""
    return {"median": float(f"{statistics.median(errors):.4g}"), "max": float(f"{max(errors):.4g}"),
            "seeds": len(errors)}


def seeded_errors(method: Callable[..., torch.Tensor], tuned, base, ref: torch.Tensor, k: int,
                  seeds: Sequence[int] = range(5)) -> list[float]:
    """σ_k relative errors of ``method`` over ``seeds`` (seeded: the same whatever ran before)."""
    return [sigma_error(method(tuned, base, k, seed), ref, k) for seed in seeds]


def check_sigma(s_ours, s_peer, ref, k: int, limit: float = LIMIT) -> None:
    """One draw: ours' σ_k error under ``limit`` and no higher than the peer's (plus float32 round-off)."""
    e_o = sigma_error(s_ours, ref, k)
    if e_o >= limit:
        raise CaseFailed(f"ours: σ_{k} relative error {e_o:.2e} (limit {limit:g})")
    if s_peer is not None:
        e_p = sigma_error(s_peer, ref, k)
        if e_o > e_p + 1e-6:
            raise CaseFailed(f"ours: σ_{k} relative error {e_o:.2e} is above svd_lowrank's {e_p:.2e}")


def check_errors(mine: Sequence[float], peer: Sequence[float] | None, k: int, limit: float = LIMIT) -> None:
    """Over the same seeds: ours' worst σ_k error under ``limit``, and its median no higher than
    the peer's ("at equal or better error"; the worst of a handful of random starts is one tail
    draw, reported in the figure's extra, not compared)."""
    worst = max(mine)
    if worst >= limit:
        raise CaseFailed(f"ours: σ_{k} relative error up to {worst:.2e} over {len(mine)} starts (limit {limit:g})")
    if peer is not None:
        m_o, m_p = statistics.median(mine), statistics.median(peer)
        if m_o > m_p:
            raise CaseFailed(f"ours: σ_{k} relative error median {m_o:.2e} / max {worst:.2e} above "
                             f"svd_lowrank's {m_p:.2e} / {max(peer):.2e} over {len(mine)} starts")


# ------------------------------------------------------------------ the group
_GOAL = Goal(">=", 1.25, "≤ 0.8× svd_lowrank's time (≥ 1.25×) at equal or lower error")


def _versus_lowrank(fig: Figure, kind: str, T, B, ref, k: int, rounds: int, seeds: Sequence[int]) -> Figure:
    """Time ours against svd_lowrank (``kind`` "pair" or "single") and check the seeded errors."""
    methods = PAIR_METHODS if kind == "pair" else SINGLE_METHODS
    mine, theirs = methods["ours"], methods["lowrank"]
    errs: dict[str, list[float]] = {}

    def check(_o, _p):
        errs["ours"] = seeded_errors(mine, T, B, ref, k, seeds)
        errs["lowrank"] = seeded_errors(theirs, T, B, ref, k, seeds)
        check_errors(errs["ours"], errs["lowrank"], k)

    measure(fig, lambda: mine(T, B, k), lambda: theirs(T, B, k), check, rounds=rounds,
            ours_name="truncated_svd", peer_name="torch.svd_lowrank")
    for side, e in errs.items():
        fig.extra[f"{side}_sigma_k_rel_err"] = error_summary(e)
    return fig


def run(ctx: BenchContext) -> list[Figure]:
    """The svd group on the CPU: pairs at ``ctx.sizes.svd_shapes`` × ``svd_ranks`` × {f32, bf16}
    (f32 only with ``quick``), the full SVD once, and single matrices of the first shape."""
    figs: list[Figure] = []
    rounds = max(ctx.sizes.rounds, 3)
    seeds = range(3) if ctx.sizes.quick else range(5)
    kmax = max(ctx.sizes.svd_ranks)
    threads = torch.get_num_threads()

    def config(shape, dt, k, kind, ref):
        return {"shape": list(shape), "dtype": dt, "rank": k, "input": kind, "peer_oversample": OVERSAMPLE,
                "peer_power_iters": POWER_ITERS, "torch_threads": threads, "error_seeds": len(seeds),
                "reference": "LAPACK float64" if len(ref) == min(shape) else "converged subspace iteration"}

    for shape in ctx.sizes.svd_shapes:
        label = f"{shape[0]}×{shape[1]}"
        for dt in (("f32",) if ctx.sizes.quick else tuple(DTYPES)):
            ctx.progress(f"pair {label} {dt}: reference σ")
            T, B = make_pair(shape, DTYPES[dt])
            ref = reference_sigma(T, B, kmax)
            figs += _over_ranks(ctx, "pair", shape, dt, T, B, ref, rounds, seeds, config)
            if dt == "f32" and shape == ctx.sizes.svd_shapes[0]:
                figs.append(_versus_full(ctx, shape, T, B, ref, min(ctx.sizes.svd_ranks)))
            del T, B
    shape = ctx.sizes.svd_shapes[0]
    label = f"{shape[0]}×{shape[1]}"
    for dt in DTYPES:
        ctx.progress(f"single {label} {dt}: reference σ")
        M = make_single(shape, DTYPES[dt])
        ref = reference_sigma(M, None, kmax)
        figs += _over_ranks(ctx, "single", shape, dt, M, None, ref, rounds, seeds, config)
    return figs


def _over_ranks(ctx: BenchContext, kind: str, shape, dt: str, T, B, ref, rounds: int, seeds, config
                ) -> list[Figure]:
    """One figure per rank of ``ctx.sizes.svd_ranks``: ours against ``svd_lowrank`` on a pair
    (``kind="pair"``, ``T`` − ``B``) or on one matrix (``kind="single"``, ``B`` is None)."""
    label = f"{shape[0]}×{shape[1]}"
    figs = []
    for k in ctx.sizes.svd_ranks:
        ctx.progress(f"{kind} {label} {dt} rank {k}")
        fid = f"svd.{shape[0]}x{shape[1]}_{dt}_r{k}" if kind == "pair" else f"svd.single_{shape[0]}x{shape[1]}_{dt}_r{k}"
        what = "tuned − base" if kind == "pair" else "one matrix"
        fig = Figure(fid, "svd", f"truncated SVD of {what}, {label} {dt}, rank {k}", goal=_GOAL,
                     check=f"σ_k error over {len(seeds)} starts < 2 %, median ≤ svd_lowrank's",
                     config=config(shape, dt, k, kind, ref))
        figs.append(_versus_lowrank(fig, kind, T, B, ref, k, rounds, seeds))
    return figs


def _versus_full(ctx: BenchContext, shape, T, B, ref, k: int) -> Figure:
    """Ours against the full ``torch.linalg.svd`` (mergekit's method), one round."""
    ctx.progress(f"{shape[0]}×{shape[1]} full SVD (mergekit's method), one round")
    fig = Figure(f"svd.{shape[0]}x{shape[1]}_f32_r{k}_vs_full", "svd",
                 f"truncated SVD vs full torch.linalg.svd, {shape[0]}×{shape[1]} f32, rank {k}",
                 goal=Goal(">=", 50.0, "≥ 50× the full SVD"),
                 check="full SVD's σ₁..σ_k equal the reference within 1e-4; ours within 2 %",
                 config={"shape": list(shape), "dtype": "f32", "rank": k})

    def check_full(o, p):
        check_sigma(o, None, ref, k)
        err = float(((p.double() - ref[:k]).abs() / ref[:k]).max())
        if err > 1e-4:
            raise CaseFailed(f"full SVD σ differs from the reference by {err:.2e} (limit 1e-4)")

    return measure(fig, lambda: ours(T, B, k), lambda: full_svd(T, B, k), check_full, rounds=1, warmup=0,
                   ours_name="truncated_svd", peer_name="torch.linalg.svd (full)")
