"""Benchmark group ``svd``: randomized truncated SVD of a checkpoint delta, ``truncated_svd((tuned, base), k)``
against ``torch.svd_lowrank`` and, once per run, against the full ``torch.linalg.svd`` that
mergekit's extract-lora runs per module.

The pair is a planted spectrum (σᵢ = 0.96ⁱ over 256 directions) on top of a random base plus
noise, in float32 and bfloat16. Every method starts from the two checkpoints, so the peers'
times include forming the float32 delta. The peer runs at oversample 10 and 2 power iterations
(its usual settings). Correctness: σ_k's relative error against a converged reference (subspace
iteration, 8 power iterations, 64 oversamples) — ours under 2 %, and no worse than the peer's
at the same seed; the full SVD's σ₁..σ_k equal the reference's within 1e-4.
"""

from __future__ import annotations

import torch

from ..core import BenchContext, CaseFailed, Figure, Goal, measure

__all__ = ["make_pair", "reference_sigma", "ours", "lowrank", "full_svd", "sigma_error", "check_sigma", "run",
           "OVERSAMPLE", "POWER_ITERS"]

OVERSAMPLE, POWER_ITERS = 10, 2  # the peers' settings
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


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


def reference_sigma(tuned, base, k: int) -> torch.Tensor:
    """Converged σ₁..σ_k (float64): subspace iteration with 8 power iterations, 64 oversamples."""
    from ...linalg import truncated_svd

    return truncated_svd((tuned, base), k, oversample=64, power_iters=8, method="subspace").S.double()


def ours(tuned, base, k: int, seed: int = 0) -> torch.Tensor:
    """σ of ``truncated_svd`` with its defaults (block Krylov, one step)."""
    from ...linalg import truncated_svd

    return truncated_svd((tuned, base), k, seed=seed).S


def lowrank(tuned, base, k: int, seed: int = 0) -> torch.Tensor:
    """σ of ``torch.svd_lowrank`` on the float32 delta, at oversample 10, 2 power iterations."""
    torch.manual_seed(seed)
    return torch.svd_lowrank(tuned.float() - base.float(), q=k + OVERSAMPLE, niter=POWER_ITERS)[1]


def full_svd(tuned, base, k: int) -> torch.Tensor:
    """σ₁..σ_k of the full ``torch.linalg.svd`` of the float32 delta (mergekit's method)."""
    return torch.linalg.svd(tuned.float() - base.float(), full_matrices=False)[1][:k]


def sigma_error(sigma: torch.Tensor, ref: torch.Tensor, k: int) -> float:
    return float(abs(sigma.double()[k - 1] - ref[k - 1]) / ref[k - 1])


def check_sigma(s_ours, s_peer, ref, k: int, limit: float = 2e-2) -> None:
    """Ours' σ_k error under ``limit`` and no higher than the peer's (plus float32 round-off)."""
    e_o = sigma_error(s_ours, ref, k)
    if e_o >= limit:
        raise CaseFailed(f"ours: σ_{k} relative error {e_o:.2e} (limit {limit:g})")
    if s_peer is not None:
        e_p = sigma_error(s_peer, ref, k)
        if e_o > e_p + 1e-6:
            raise CaseFailed(f"ours: σ_{k} relative error {e_o:.2e} is above svd_lowrank's {e_p:.2e}")


def run(ctx: BenchContext) -> list[Figure]:
    """The svd group at ``ctx.sizes.svd_shapes`` × ``svd_ranks`` × {f32, bf16}, on the CPU."""
    figs = []
    rounds = max(ctx.sizes.rounds, 3)
    dtypes = ("f32",) if ctx.sizes.quick else tuple(DTYPES)
    for shape in ctx.sizes.svd_shapes:
        for dt in dtypes:
            ctx.progress(f"pair {shape[0]}×{shape[1]} {dt}")
            T, B = make_pair(shape, DTYPES[dt])
            kmax = max(ctx.sizes.svd_ranks)
            ref = reference_sigma(T, B, kmax)
            for k in ctx.sizes.svd_ranks:
                ctx.progress(f"{shape[0]}×{shape[1]} {dt} rank {k}")
                cfg = {"shape": list(shape), "dtype": dt, "rank": k, "peer_oversample": OVERSAMPLE,
                       "peer_power_iters": POWER_ITERS, "torch_threads": torch.get_num_threads()}
                fig = Figure(f"svd.{shape[0]}x{shape[1]}_{dt}_r{k}", "svd",
                             f"truncated SVD of tuned − base, {shape[0]}×{shape[1]} {dt}, rank {k}",
                             goal=Goal(">=", 1.25, "≤ 0.8× svd_lowrank's time (≥ 1.25×) at equal or lower error"),
                             check="σ_k error < 2 % and ≤ svd_lowrank's at the same seed", config=cfg)
                figs.append(measure(fig, lambda: ours(T, B, k), lambda: lowrank(T, B, k),
                                    lambda o, p: check_sigma(o, p, ref, k),
                                    rounds=rounds, ours_name="truncated_svd", peer_name="torch.svd_lowrank"))
            if dt == "f32" and shape == ctx.sizes.svd_shapes[0]:
                k = min(ctx.sizes.svd_ranks)
                ctx.progress(f"{shape[0]}×{shape[1]} full SVD (mergekit's method), one round")
                fig = Figure(f"svd.{shape[0]}x{shape[1]}_f32_r{k}_vs_full", "svd",
                             f"truncated SVD vs full torch.linalg.svd, {shape[0]}×{shape[1]} f32, rank {k}",
                             goal=Goal(">=", 50.0, "≥ 50× the full SVD"),
                             check="full SVD's σ₁..σ_k equal the converged reference within 1e-4; ours within 2 %",
                             config={"shape": list(shape), "dtype": "f32", "rank": k})

                def check_full(o, p, k=k):
                    check_sigma(o, None, ref, k)
                    err = float(((p.double() - ref[:k]).abs() / ref[:k]).max())
                    if err > 1e-4:
                        raise CaseFailed(f"full SVD σ differs from the reference by {err:.2e} (limit 1e-4)")

                figs.append(measure(fig, lambda k=k: ours(T, B, k), lambda k=k: full_svd(T, B, k), check_full,
                                    rounds=1, warmup=0, ours_name="truncated_svd",
                                    peer_name="torch.linalg.svd (full)"))
    return figs
