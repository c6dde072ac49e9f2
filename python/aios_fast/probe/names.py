"""Module-name parsing shared by the heat map and its renderer (kept apart so that
``heatmap`` imports ``render`` and ``render`` imports neither back)."""

from __future__ import annotations

import re

__all__ = ["split_name"]

_LAYER_RX = re.compile(r"^(?:(.*?)\.)?(\d+)\.(.+)$")


def split_name(name: str) -> tuple[int | None, str]:
    """``encoder.layer.3.attention.self.query`` -> ``(3, "attention.self.query")``;
    names without a layer index -> ``(None, name)``."""
    m = _LAYER_RX.match(name)
    if not m:
        return None, name
    return int(m.group(2)), m.group(3)
