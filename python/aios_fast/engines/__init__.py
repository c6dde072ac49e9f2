"""Engines on the bundled models, offline: a sentence encoder (all-MiniLM-L6-v2 or any BERT-family
sentence-transformers directory), a causal LM (SmolLM2-135M-Instruct from its GGUF), and the
weight converter to and from ArrowEngine's Parquet layout plus checkpoint readers.

Classes are imported lazily so that ``import aios_fast.engines`` stays light."""

from __future__ import annotations

from .._lazy import lazy_exports

__all__ = ["SentenceEncoder", "CausalLM", "ModelConverter", "load_state_dict", "iter_tensors"]

_LAZY = {
    "SentenceEncoder": ".encoder",
    "CausalLM": ".causal",
    "ModelConverter": ".converter",
    "load_state_dict": ".checkpoints",
    "iter_tensors": ".checkpoints",
}

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
