"""The skill factory (Tier 3.5): nightly domain skills from the QA log, model rotation into
incremental cards, batch extraction, on a local process pool or on Ray."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "SkillFactory": ".factory",
    "FactoryConfig": ".factory",
    "FactoryReport": ".factory",
    "DomainClusterer": ".domains",
    "Journal": ".journal",
    "RunLock": ".journal",
    "TrainJob": ".jobs",
    "ExtractJob": ".jobs",
    "InlineExecutor": ".executors",
    "LocalExecutor": ".executors",
    "RayExecutor": ".executors",
    "load_jobs": ".batch",
    "run_batch": ".batch",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
