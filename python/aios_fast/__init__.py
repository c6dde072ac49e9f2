"""aios-fast: the compiled engine room of a self-evolving local AI node.

Public classes are imported lazily so that ``import aios_fast`` stays light (no torch or
transformers until a class that needs them is used).
"""

from __future__ import annotations

from ._lazy import lazy_exports
from .errors import (
    AiosError,
    BackendUnavailableError,
    CardFormatError,
    CardMismatchError,
    InputError,
    SkillRejectedError,
    TrainingDivergedError,
)

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "WeightMapProbe": "aios_fast.probe",
    "HeatMap": "aios_fast.probe",
    "token_norm_stats": "aios_fast.kernels.norms",
    "LoRACard": "aios_fast.cards",
    "LoRAFormat": "aios_fast.cards",
    "LoRAManager": "aios_fast.lora",
    "SentenceEncoder": "aios_fast.engines",
    "CausalLM": "aios_fast.engines",
    "ModelConverter": "aios_fast.engines",
    "truncated_svd": "aios_fast.linalg",
    "LoRAExtractor": "aios_fast.extract",
    "LoRATrainer": "aios_fast.learn",
    "QALogger": "aios_fast.learn",
    "validate": "aios_fast.learn",
    "hardware": "aios_fast.hardware",
    "backends": "aios_fast.backends",
    # the loop: routing and the node (route/, evolve/)
    "SkillLibrary": "aios_fast.route",
    "SkillEntry": "aios_fast.route",
    "LoRARouter": "aios_fast.route",
    "RouteResult": "aios_fast.route",
    "CognitiveTrigger": "aios_fast.evolve",
    "LearningRequest": "aios_fast.evolve",
    "SkillNode": "aios_fast.evolve",
    # learning from teachers and documents
    "OpenAICompatibleProvider": "aios_fast.evolve",
    "LocalTeacher": "aios_fast.evolve",
    "CloudDistiller": "aios_fast.evolve",
    "SkillDistiller": "aios_fast.evolve",
    # federation and the factory
    "FederationManager": "aios_fast.federation",
    "SkillFactory": "aios_fast.factory",
}

__all__ = [
    "__version__",
    "AiosError",
    "BackendUnavailableError",
    "CardFormatError",
    "CardMismatchError",
    "InputError",
    "SkillRejectedError",
    "TrainingDivergedError",
    *_LAZY,
]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
