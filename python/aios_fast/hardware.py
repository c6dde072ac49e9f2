"""Detects the node's hardware tier (Leaf / Hub / Super) and which learning tiers it may run.

Rules (DESIGN.md): Super has CUDA GPU memory of 24 GB or more in total; Hub has one GPU with
8 GB or more; everything else (CPU only, an integrated or small GPU) is a Leaf.
``AIOS_FAST_TIER=leaf|hub|super`` overrides the detection.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any, Mapping

from .errors import InputError

__all__ = ["Tier", "GPUInfo", "HardwareProfile", "detect", "LEARNING_TIERS"]

GIB = 1024**3
SUPER_GPU_GB = 24.0
HUB_GPU_GB = 8.0


class Tier(str, Enum):
    LEAF = "leaf"
    HUB = "hub"
    SUPER = "super"


# Which knowledge sources (DESIGN.md's learning tiers) each hardware tier may run.
LEARNING_TIERS: dict[Tier, tuple[str, ...]] = {
    Tier.LEAF: ("1:federation", "2:distillation(light)"),
    Tier.HUB: ("1:federation", "2:distillation", "2:local-training"),
    Tier.SUPER: ("1:federation", "2:distillation", "2:local-training", "3:extraction",
                 "3.5:skill-factory"),
}


@dataclass(frozen=True)
class GPUInfo:
    index: int
    name: str
    memory_gb: float
    capability: str


@dataclass(frozen=True)
class HardwareProfile:
    tier: Tier
    reason: str
    ram_gb: float
    gpus: list[GPUInfo] = field(default_factory=list)
    overridden: bool = False

    @property
    def learning_tiers(self) -> tuple[str, ...]:
        return LEARNING_TIERS[self.tier]

    def may_run(self, learning_tier: str) -> bool:
        """True when e.g. ``"3"`` (extraction) is allowed on this node."""
        return any(t.split(":")[0] == str(learning_tier) for t in self.learning_tiers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tier"] = self.tier.value
        d["learning_tiers"] = list(self.learning_tiers)
        return d


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0.0


def _cuda_gpus() -> list[GPUInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(GPUInfo(i, p.name, round(p.total_memory / GIB, 1), f"{p.major}.{p.minor}"))
    return gpus


def classify(gpus: list[GPUInfo], ram_gb: float) -> tuple[Tier, str]:
    """The tier for a given inventory, with the reason (pure function, testable)."""
    total = sum(g.memory_gb for g in gpus)
    if total >= SUPER_GPU_GB:
        return Tier.SUPER, (f"{len(gpus)} CUDA GPU(s) with {total:.1f} GB in total "
                            f"(>= {SUPER_GPU_GB:.0f} GB)")
    if gpus and max(g.memory_gb for g in gpus) >= HUB_GPU_GB:
        best = max(gpus, key=lambda g: g.memory_gb)
        return Tier.HUB, f"CUDA GPU {best.name} with {best.memory_gb:.1f} GB (>= {HUB_GPU_GB:.0f} GB)"
    if gpus:
        return Tier.LEAF, (f"CUDA GPU memory {total:.1f} GB is under {HUB_GPU_GB:.0f} GB; "
                           f"treated as a small GPU")
    note = " (under 8 GB RAM)" if ram_gb < 8 else ""
    return Tier.LEAF, f"no CUDA GPU; CPU with {ram_gb:.1f} GB RAM{note}"


def detect(env: Mapping[str, str] | None = None) -> HardwareProfile:
    """This node's profile. ``AIOS_FAST_TIER`` forces the tier (the reason says so)."""
    env = os.environ if env is None else env
    gpus = _cuda_gpus()
    ram = round(_ram_gb(), 1)
    forced = env.get("AIOS_FAST_TIER", "").strip().lower()
    if forced:
        try:
            tier = Tier(forced)
        except ValueError:
            raise InputError(f"AIOS_FAST_TIER={forced!r} is not a tier; use one of "
                             f"{[t.value for t in Tier]}") from None
        detected, why = classify(gpus, ram)
        return HardwareProfile(tier, f"forced by AIOS_FAST_TIER (detected {detected.value}: {why})",
                               ram, gpus, overridden=True)
    tier, why = classify(gpus, ram)
    return HardwareProfile(tier, why, ram, gpus)
