"""PNG rendering of a HeatMap with matplotlib (Agg): a layer x module-kind grid for
transformer-like names (``...<layer>.<kind>``), else a horizontal bar chart."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._atomic import save_figure
from .names import split_name

if TYPE_CHECKING:
    from .heatmap import HeatMap

__all__ = ["render_png"]

_LABELS = {"raw_l2": "raw L2 (seed)", "mean_norm": "mean token norm",
           "contrast": "contrast log(task/baseline)", "effect_size": "effect size (Cohen's d)"}


def _grid(hm: "HeatMap", scores: dict[str, float]):
    layers: list[int] = []
    kinds: list[str] = []
    cells: dict[tuple[int, str], float] = {}
    for m in hm.modules:
        layer, kind = split_name(m)
        if layer is None:
            continue
        if layer not in layers:
            layers.append(layer)
        if kind not in kinds:
            kinds.append(kind)
        cells[(layer, kind)] = scores[m]
    layers.sort()
    return layers, kinds, cells


def render_png(hm: "HeatMap", path: Path, score: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    scores = hm.scores(score)
    layers, kinds, cells = _grid(hm, scores)
    title = f"{hm.metadata.get('model', 'model')}: {_LABELS.get(score, score)}"
    if len(layers) >= 2 and len(cells) >= len(hm.modules) // 2:
        grid = np.full((len(kinds), len(layers)), np.nan)
        for (layer, kind), v in cells.items():
            grid[kinds.index(kind), layers.index(layer)] = v
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(layers), 1.4 + 0.5 * len(kinds)))
        diverging = score in ("contrast", "effect_size")
        if diverging:
            lim = float(np.nanmax(np.abs(grid))) or 1.0
            im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        else:
            im = ax.imshow(grid, cmap="inferno", aspect="auto")
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(len(kinds)), kinds)
        ax.set_xlabel("layer")
        if grid.size <= 400:
            finite = grid[np.isfinite(grid)]
            mid = float(np.median(finite)) if finite.size else 0.0
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    dark = (abs(v) < 0.5 * lim) if diverging else v < mid
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7,
                            color="black" if (diverging and dark) or (not diverging and not dark) else "white")
        fig.colorbar(im, ax=ax, label=_LABELS.get(score, score))
        others = [m for m in hm.modules if split_name(m)[0] is None]
        if others:
            title += f"\n(not in grid: {', '.join(others[:3])}{'...' if len(others) > 3 else ''})"
    else:
        names = list(hm.modules)
        vals = [scores[m] for m in names]
        fig, ax = plt.subplots(figsize=(7, 1 + 0.25 * len(names)))
        ax.barh(range(len(names)), vals, color="tab:orange")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(_LABELS.get(score, score))
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")
