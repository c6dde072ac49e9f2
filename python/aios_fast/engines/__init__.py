"""Engines on the bundled models, offline: a sentence encoder (all-MiniLM-L6-v2 or any BERT-family
sentence-transformers directory), a causal LM (SmolLM2-135M-Instruct from its GGUF), and the
weight converter to and from ArrowEngine's Parquet layout plus checkpoint readers.

Classes are imported lazily so that ``import aios_fast.engines`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["SentenceEncoder", "CausalLM", "ModelConverter", "load_state_dict", "iter_tensors"]

_LAZY = {
    "SentenceEncoder": ".encoder",
    "CausalLM": ".causal",
    "ModelConverter": ".converter",
    "load_state_dict": ".checkpoints",
    "iter_tensors": ".checkpoints",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'aios_fast.engines' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
