"""Translates module keys between Hugging Face ``named_modules()`` names and ArrowEngine's
internal names. Cards record which scheme their keys use (``naming``: ``hf`` or ``arrowengine``)."""

from __future__ import annotations

import re

from ..errors import InputError

__all__ = ["SCHEMES", "to_hf", "to_arrowengine", "convert"]

SCHEMES = ("hf", "arrowengine")

# (ArrowEngine pattern, Hugging Face BERT pattern); {i} is the layer index.
_PAIRS = [
    ("encoder_layers.{i}.attention.query", "encoder.layer.{i}.attention.self.query"),
    ("encoder_layers.{i}.attention.key", "encoder.layer.{i}.attention.self.key"),
    ("encoder_layers.{i}.attention.value", "encoder.layer.{i}.attention.self.value"),
    ("encoder_layers.{i}.attention_output", "encoder.layer.{i}.attention.output.dense"),
    ("encoder_layers.{i}.intermediate", "encoder.layer.{i}.intermediate.dense"),
    ("encoder_layers.{i}.output_dense", "encoder.layer.{i}.output.dense"),
]


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_AE_TO_HF = [(_compile(ae), hf) for ae, hf in _PAIRS]
_HF_TO_AE = [(_compile(hf), ae) for ae, hf in _PAIRS]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    # Keys may carry a prefix such as "0.auto_model." (sentence-transformers) or "bert."
    for pat, target in table:
        for start in [0] + [m.end() for m in re.finditer(r"\.", name)]:
            m = pat.match(name[start:])
            if m:
                return name[:start] + target.replace("{i}", m.group(1))
    return None


def to_hf(name: str) -> str:
    """ArrowEngine name -> Hugging Face name; names with no ArrowEngine form pass through."""
    return _translate(name, _AE_TO_HF) or name


def to_arrowengine(name: str) -> str:
    """Hugging Face name -> ArrowEngine name; names with no ArrowEngine form pass through."""
    return _translate(name, _HF_TO_AE) or name


def convert(name: str, source: str, target: str) -> str:
    """Translate ``name`` from scheme ``source`` to scheme ``target``."""
    for s in (source, target):
        if s not in SCHEMES:
            raise InputError(f"naming scheme {s!r} is unknown; use one of {SCHEMES}")
    if source == target:
        return name
    return to_hf(name) if target == "hf" else to_arrowengine(name)
