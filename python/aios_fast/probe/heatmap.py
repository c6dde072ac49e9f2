"""HeatMap: per-module activation statistics of a probe run, their scores, Parquet and PNG.

Scores (higher = lights up more):

* ``raw_l2``: the seed's score, ``torch.norm`` of a module's whole output accumulated over
  the run as ``sqrt(total sum of squares)``. It grows with the number of tokens and with the
  module's width, so it mostly ranks big modules; kept for comparison.
* ``mean_norm``: mean L2 norm per real token. Independent of corpus size, but still
  dominated by each module type's scale (an MLP up-projection always out-shines a query).
* ``contrast`` (needs a baseline corpus): ``log(mean_norm_task / mean_norm_baseline)``. A ratio
  cancels each module's own scale, so modules of different types compete on how much *more*
  they respond to the task than to generic text; the log makes it symmetric (0 = no
  difference, +0.1 ~ 10 % more) and additive across layers. This is the default score when a
  baseline exists.
* ``effect_size`` (needs a baseline): standardised difference of mean token norms,
  ``(m_t - m_b) / sqrt((s_t^2 + s_b^2) / 2)`` (Cohen's d), from the per-token norm variance
  the kernel's sum of squared norms gives. Discounts modules whose token norms are noisy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_write
from ..errors import InputError
from .names import split_name

__all__ = ["HeatMap", "split_name", "SCORES"]

SCORES = ("raw_l2", "mean_norm", "contrast", "effect_size")
_STAT_KEYS = ("count", "sum", "sumsq", "max", "mean_norm", "raw_l2", "std_norm")
_FORMAT_VERSION = "1"
@dataclass
class HeatMap:
    """Result of :meth:`WeightMapProbe.probe`.

    Attributes:
        modules: module names in model order.
        stats: per module ``{count, sum, sumsq, max, mean_norm, raw_l2, std_norm}`` on the task.
        channel_energy: per module float32 per-feature sum of squares on the task.
        baseline / baseline_channel_energy: the same on the baseline corpus, or None.
        metadata: free strings (model name, corpora) stored with the Parquet file.
    """

    modules: list[str]
    stats: dict[str, dict[str, float]]
    channel_energy: dict[str, np.ndarray]
    baseline: dict[str, dict[str, float]] | None = None
    baseline_channel_energy: dict[str, np.ndarray] | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [m for m in self.modules if m not in self.stats or m not in self.channel_energy]
        if missing:
            raise InputError(f"HeatMap: modules {missing[:5]} have no stats or channel energy")
        if self.baseline is not None:
            missing = [m for m in self.modules if m not in self.baseline]
            if missing:
                raise InputError(f"HeatMap: modules {missing[:5]} have no baseline stats")

    @property
    def has_baseline(self) -> bool:
        return self.baseline is not None

    def default_score(self) -> str:
        return "contrast" if self.has_baseline else "mean_norm"

    def scores(self, score: str | None = None) -> dict[str, float]:
        """Score of every module, ``score`` in :data:`SCORES` (default: contrast with a baseline,
        else mean_norm)."""
        score = score or self.default_score()
        if score not in SCORES:
            raise InputError(f"unknown score {score!r}; choose one of {list(SCORES)}")
        if score in ("raw_l2", "mean_norm"):
            return {m: float(self.stats[m][score]) for m in self.modules}
        if self.baseline is None:
            raise InputError(f"score {score!r} needs baseline inputs: probe(task, baseline_inputs=...)")
        out = {}
        for m in self.modules:
            t, b = self.stats[m], self.baseline[m]
            if score == "contrast":
                tiny = 1e-30  # a module silent on both corpora scores 0, not nan
                out[m] = math.log((t["mean_norm"] + tiny) / (b["mean_norm"] + tiny))
            else:
                pooled = math.sqrt((t["std_norm"] ** 2 + b["std_norm"] ** 2) / 2)
                out[m] = (t["mean_norm"] - b["mean_norm"]) / pooled if pooled > 0 else 0.0
        return out

    def hot_zones(self, top_k: int = 10, score: str | None = None) -> list[tuple[str, float]]:
        """The ``top_k`` modules with the highest score, best first."""
        if top_k < 1:
            raise InputError(f"top_k must be >= 1, got {top_k}")
        s = self.scores(score)
        return sorted(s.items(), key=lambda kv: (-kv[1], self.modules.index(kv[0])))[:top_k]

    # ----------------------------------------------------------------- Parquet
    def to_table(self) -> Any:
        import pyarrow as pa

        cols: dict[str, Any] = {"module": pa.array(self.modules, pa.string())}
        parsed = [split_name(m) for m in self.modules]
        cols["layer"] = pa.array([p[0] for p in parsed], pa.int32())
        cols["kind"] = pa.array([p[1] for p in parsed], pa.string())
        for k in _STAT_KEYS:
            cols[k] = pa.array([float(self.stats[m][k]) for m in self.modules], pa.float64())
        cols["channel_energy"] = pa.array([np.asarray(self.channel_energy[m], np.float32) for m in self.modules],
                                          pa.list_(pa.float32()))
        if self.baseline is not None:
            for k in _STAT_KEYS:
                cols[f"baseline_{k}"] = pa.array([float(self.baseline[m][k]) for m in self.modules], pa.float64())
            if self.baseline_channel_energy is not None:
                cols["baseline_channel_energy"] = pa.array(
                    [np.asarray(self.baseline_channel_energy[m], np.float32) for m in self.modules],
                    pa.list_(pa.float32()))
        meta = {"aios_heatmap_version": _FORMAT_VERSION, **{f"meta.{k}": str(v) for k, v in self.metadata.items()}}
        return pa.table(cols).replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a Parquet file (one row per module; channel energy as list<float>), atomically."""
        import pyarrow.parquet as pq

        path = Path(path)
        table = self.to_table()
        atomic_write(path, lambda fh: pq.write_table(table, fh))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "HeatMap":
        """Read a heat map written by :meth:`save`."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise InputError(f"{path}: not a readable Parquet heat map ({exc})") from None
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("aios_heatmap_version") != _FORMAT_VERSION:
            raise InputError(f"{path}: aios_heatmap_version is {meta.get('aios_heatmap_version')!r}, "
                             f"expected {_FORMAT_VERSION!r}")
        need = {"module", "channel_energy", *_STAT_KEYS}
        if not need <= set(table.column_names):
            raise InputError(f"{path}: missing columns {sorted(need - set(table.column_names))}")
        data = table.to_pydict()
        modules = list(data["module"])

        def stats(prefix: str) -> dict[str, dict[str, float]]:
            return {m: {k: float(data[prefix + k][i]) for k in _STAT_KEYS} for i, m in enumerate(modules)}

        def energy(col: str) -> dict[str, np.ndarray]:
            arr = table.column(col).combine_chunks()
            return {m: arr[i].values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                    for i, m in enumerate(modules)}

        has_base = "baseline_count" in data
        return cls(modules=modules, stats=stats(""), channel_energy=energy("channel_energy"),
                   baseline=stats("baseline_") if has_base else None,
                   baseline_channel_energy=energy("baseline_channel_energy")
                   if "baseline_channel_energy" in data else None,
                   metadata={k[5:]: v for k, v in meta.items() if k.startswith("meta.")})

    def to_png(self, path: str | os.PathLike[str], score: str | None = None) -> Path:
        """Render the heat map (layer x module kind grid, or a bar chart) to a PNG."""
        from .render import render_png

        return render_png(self, Path(path), score or self.default_score())
