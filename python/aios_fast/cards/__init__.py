"""Skill cards: ``LoRACard`` (the in-memory card), ``LoRAFormat`` (``.lora.arrow`` v1/v2
files, see ``docs/card-format.md``) and ``fingerprint_model`` (base-model identity)."""

from __future__ import annotations

from .card import LoRACard
from .fingerprint import fingerprint_model
from .format import LoRAFormat

__all__ = ["LoRACard", "LoRAFormat", "fingerprint_model"]
