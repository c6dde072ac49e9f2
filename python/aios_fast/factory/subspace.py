"""Low-rank algebra on LoRA factors that never forms ΔW = s·B·A.

- :func:`factor_svd`: the thin SVD of ``s·B·A`` from its factors: ``B = Q_b R_b``,
  ``Aᵀ = Q_a R_a`` (QR), then the SVD of the small core ``s·R_b R_aᵀ`` (r × r). Cost
  O((m + n)·r²) instead of O(m·n·r).
- :func:`subspace_similarity`: principal angles (Björck & Golub 1973) between the column
  spaces and between the row spaces of two updates, from :func:`factor_svd`'s bases; the
  similarity is the mean squared cosine of the angles (1 = same subspace, 0 = orthogonal), the
  measure Hu et al. (2021, LoRA §7.2) use to compare adapters of different ranks.
- :func:`delta_cosine`: ``<ΔW₁, ΔW₂>_F / (‖ΔW₁‖‖ΔW₂‖)`` through r×r Gram products.
- :func:`combine_factors`: the best rank-``r`` approximation (Eckart–Young) of a sum of LoRA
  updates, as new factors - how a warm-started skill stays at its rank.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["factor_svd", "subspace_similarity", "delta_cosine", "delta_norm", "combine_factors"]


def factor_svd(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0, tol: float = 1e-7):
    """``(U, S, V)`` with ``scale·B·A = U diag(S) Vᵀ``, U (m, k), V (n, k), k <= r, singular
    values below ``tol·S[0]`` dropped. B is (m, r), A is (r, n) (PEFT orientation)."""
    B = B.detach().to(torch.float64)
    A = A.detach().to(torch.float64)
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    core = scale * (Rb @ Ra.T)
    Uc, S, Vch = torch.linalg.svd(core)
    keep = int((S > tol * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    return Qb @ Uc[:, :keep], S[:keep], Qa @ Vch[:keep].T


def _mean_cos2(U1: torch.Tensor, U2: torch.Tensor) -> float:
    if U1.shape[1] == 0 or U2.shape[1] == 0:
        return 0.0
    cos = torch.linalg.svdvals(U1.T @ U2).clamp(0, 1)  # cosines of the principal angles
    return float((cos ** 2).sum() / min(U1.shape[1], U2.shape[1]))


def subspace_similarity(B1, A1, B2, A2) -> dict[str, float]:
    """Principal-angle similarity of two LoRA updates: ``left`` (column spaces), ``right`` (row
    spaces), ``similarity`` (their mean) and ``min_angle_deg`` (smallest principal angle of the
    column spaces)."""
    U1, _, V1 = factor_svd(B1, A1)
    U2, _, V2 = factor_svd(B2, A2)
    left, right = _mean_cos2(U1, U2), _mean_cos2(V1, V2)
    cos = torch.linalg.svdvals(U1.T @ U2).clamp(0, 1) if U1.shape[1] and U2.shape[1] else torch.zeros(1)
    return {"left": left, "right": right, "similarity": (left + right) / 2,
            "min_angle_deg": math.degrees(math.acos(float(cos.max())))}


def delta_norm(B, A, scale: float = 1.0) -> float:
    """‖scale·B·A‖_F = sqrt(trace((BᵀB)(AAᵀ))) · |scale|."""
    B = B.detach().to(torch.float64)
    A = A.detach().to(torch.float64)
    return abs(scale) * math.sqrt(max(float(((B.T @ B) * (A @ A.T)).sum()), 0.0))


def delta_cosine(B1, A1, s1: float, B2, A2, s2: float) -> float:
    """Frobenius cosine between ``s1·B1A1`` and ``s2·B2A2``:
    ``trace(A1ᵀB1ᵀB2A2) = sum((B1ᵀB2) ∘ (A1A2ᵀ))`` (r₁ × r₂ products only)."""
    B1, A1, B2, A2 = (t.detach().to(torch.float64) for t in (B1, A1, B2, A2))
    inner = s1 * s2 * float(((B1.T @ B2) * (A1 @ A2.T)).sum())
    n1, n2 = delta_norm(B1, A1, s1), delta_norm(B2, A2, s2)
    return inner / (n1 * n2) if n1 > 0 and n2 > 0 else 0.0


def combine_factors(terms: Sequence[tuple[float, torch.Tensor, torch.Tensor]], rank: int,
                    alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors ``(B, A)`` of rank ``rank`` whose card update ``(alpha/rank)·B·A`` is the best
    rank-``rank`` approximation of ``Σ sᵢ·Bᵢ·Aᵢ``; also the energy fraction kept.

    The sum is itself low rank: stacking ``[s₁B₁, s₂B₂, ...]`` and ``[A₁; A₂; ...]`` gives exact
    factors, whose SVD :func:`factor_svd` computes without forming the matrix.
    """
    Bs = torch.cat([s * b.detach().to(torch.float64) for s, b, _ in terms], 1)
    As = torch.cat([a.detach().to(torch.float64) for _, _, a in terms], 0)
    U, S, V = factor_svd(Bs, As)
    total = float((S ** 2).sum())
    k = min(rank, S.numel())
    kept = float((S[:k] ** 2).sum()) / total if total > 0 else 1.0
    root = S[:k].sqrt()
    c = math.sqrt(rank / alpha)  # (alpha/rank)·B·A must equal U S Vᵀ
    B = torch.zeros(Bs.shape[0], rank, dtype=torch.float64)
    A = torch.zeros(rank, As.shape[1], dtype=torch.float64)
    B[:, :k] = c * U[:, :k] * root[None, :]
    A[:k] = c * root[:, None] * V[:, :k].T
    return B.to(torch.float32).contiguous(), A.to(torch.float32).contiguous(), kept
