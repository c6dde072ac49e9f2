"""Activation-norm probing: which modules of a model light up on a task.

``WeightMapProbe`` hooks a model's modules and feeds their outputs to the ``token_norms``
kernel; ``HeatMap`` holds the statistics, scores and ranks modules, saves to Parquet and
renders a PNG. Small built-in corpora (``corpus("code")``, ``"cooking"``, ``"general"``) make
``aios-fast probe`` work offline with no arguments.
"""

from __future__ import annotations

from importlib import resources

from ..errors import InputError
from .heatmap import SCORES, HeatMap, split_name
from .probe import WeightMapProbe

__all__ = ["WeightMapProbe", "HeatMap", "SCORES", "split_name", "corpus", "CORPORA"]

CORPORA = ("code", "cooking", "general")


def corpus(name: str) -> list[str]:
    """A built-in corpus (one text per line): ``code`` (the default task), ``cooking``, ``general``
    (the default baseline)."""
    if name not in CORPORA:
        raise InputError(f"unknown corpus {name!r}; built-in corpora: {list(CORPORA)}")
    text = resources.files(__name__).joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
