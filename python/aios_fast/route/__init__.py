"""Routing: the node's skill library and the router that picks a skill per query (issue 9).

``SkillLibrary`` stores cards plus one atomic index; ``LoRARouter`` scores a query against every
skill's examples in one matrix product and maps (score, margin) to a calibrated confidence.
"""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "SkillLibrary": ".library",
    "SkillEntry": ".library",
    "LoRARouter": ".router",
    "RouteResult": ".router",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
