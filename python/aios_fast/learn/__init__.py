"""Learning: the QA log, the LoRA trainer and the validation gate (issue 5).

``QALogger`` records what a node was asked; ``LoRATrainer`` turns (question, answer) pairs into
a ``LoRACard``; ``validate`` decides whether the card is worth keeping. Heavy imports (torch,
transformers) happen only when the trainer or the gate is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "QALogger": ".qa_logger",
    "QARecord": ".records",
    "LoRATrainer": ".trainer",
    "TrainingReport": ".trainer",
    "TrainConfig": ".trainer",
    "validate": ".gate",
    "ValidationReport": ".gate",
    "save_validated": ".gate",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'aios_fast.learn' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
