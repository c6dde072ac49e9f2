"""Learning: the QA log, the LoRA trainer and the validation gate (issue 5).

``QALogger`` records what a node was asked; ``LoRATrainer`` turns (question, answer) pairs into
a ``LoRACard``; ``validate`` decides whether the card is worth keeping. Heavy imports (torch,
transformers) happen only when the trainer or the gate is used.
"""

from __future__ import annotations

from .._lazy import lazy_exports

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

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
