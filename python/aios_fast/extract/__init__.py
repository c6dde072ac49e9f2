"""Tier-3 extraction: skill cards from the weight deltas of a stronger / fine-tuned model.

``LoRAExtractor`` (cards from ``tuned − base``; principal factors of a weight for PiSSA),
``allocate_budget`` (probe-guided rank split), ``open_source`` (lazy checkpoint readers).
"""

from __future__ import annotations

from .extractor import DEFAULT_SKIP, LoRAExtractor, ModuleResult, allocate_budget
from .sources import WeightSource, open_source

__all__ = ["LoRAExtractor", "ModuleResult", "allocate_budget", "open_source", "WeightSource", "DEFAULT_SKIP"]
