"""Work sizes per hardware tier (DESIGN.md: Leaf, Hub, Super) and the tier this run uses.

* Leaf (CPU, < 8 GB GPU): MiniLM-sized work — the probe on a 64 × 128 batch, SVD of
  2048-wide matrices, extraction of a SmolLM2-135M-shaped pair.
* Hub (one 8–16 GB GPU): as Leaf plus 4096-wide SVD and a pair shaped like a 1B-parameter Llama.
* Super (24 GB+): as Hub plus a 7B-shaped pair (extracted on the GPU, where mergekit's full
  SVDs take minutes rather than hours) and larger probe batches.

``quick`` shrinks every group to a smoke-sized run (a 4-layer pair, one small SVD, a tiny
batch, 10 and 1,000 skills, two rounds) that finishes in minutes on 2 cores whatever the tier;
it leaves out the training-quality table (no seeds: it takes about 15 minutes on 2 cores).
"""

from __future__ import annotations

from ..errors import InputError
from ..hardware import HardwareProfile, Tier, detect
from .core import Sizes

__all__ = ["sizes_for", "resolve_tier", "TIERS"]

TIERS = ("auto", "leaf", "hub", "super")

_SIZES = {
    "leaf": dict(rounds=3, probe_batch=(64, 128), svd_shapes=((2048, 2048), (2048, 5632)),
                 svd_ranks=(16, 64), extract_pairs=("smollm2-135m",), gpu_extract_pairs=("smollm2-135m",)),
    "hub": dict(rounds=3, probe_batch=(64, 128), svd_shapes=((4096, 4096), (4096, 11008)),
                svd_ranks=(16, 64), extract_pairs=("smollm2-135m", "llama-1b"),
                gpu_extract_pairs=("smollm2-135m", "llama-1b")),
    "super": dict(rounds=5, probe_batch=(128, 256), svd_shapes=((4096, 4096), (4096, 11008), (8192, 28672)),
                  svd_ranks=(16, 64), extract_pairs=("smollm2-135m", "llama-1b"),
                  gpu_extract_pairs=("smollm2-135m", "llama-1b", "llama-7b")),
}
_QUICK = dict(rounds=2, probe_batch=(4, 64), svd_shapes=((1024, 1024),), svd_ranks=(16,),
              extract_pairs=("tiny",), gpu_extract_pairs=("tiny",), route_skills=(10, 1000),
              train_quality_seeds=())


def sizes_for(tier: str, quick: bool = False) -> Sizes:
    """The :class:`Sizes` for ``tier`` ("leaf", "hub" or "super"); ``quick`` shrinks them."""
    if tier not in _SIZES:
        raise InputError(f"tier {tier!r} is not one of {sorted(_SIZES)}")
    return Sizes(tier=tier, quick=quick, **(_QUICK if quick else _SIZES[tier]))


def resolve_tier(requested: str = "auto") -> tuple[str, HardwareProfile]:
    """The tier to size the run for: ``requested`` unless it is "auto", then the detected one.
    Returns (tier, the detected hardware profile)."""
    if requested not in TIERS:
        raise InputError(f"--tier {requested!r}: expected one of {', '.join(TIERS)}")
    profile = detect()
    tier = profile.tier.value if requested == "auto" else Tier(requested).value
    return tier, profile
