"""Calibrated routing confidence: a map from (top score, margin) to the probability that the
top-ranked skill is the right one.

The map is a two-feature logistic regression (Platt scaling, Platt 1999, extended with the
margin to the runner-up, the usual "ambiguity" signal). It is fitted on

* positives and hard cases: every skill example routed as if it were a query, with itself left
  out (leave-one-out), labelled 1 when the top-ranked skill is its own and 0 otherwise;
* negatives: texts that belong to no skill (the general corpus shipped in ``route/data/`` or
  the caller's), labelled 0 - a query that belongs to no skill has no right skill.

Quality is reported honestly with out-of-fold predictions (5-fold cross-validation): the
expected calibration error over 10 equal-width bins (Guo et al. 2017, "On Calibration of
Modern Neural Networks") and the AUROC of "belongs to some skill" against "belongs to none".

The defaults (used before a library has been calibrated) were fitted by
``python -m aios_fast.route.calibrate`` on ``route/data/tuning.json`` with the bundled MiniLM:
domains and queries distinct from the routing set the tests assert on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._atomic import atomic_write_bytes
from ..errors import InputError

__all__ = ["ConfidenceMap", "DEFAULT_MAP", "expected_calibration_error", "auroc",
           "general_negatives", "load_calibration", "save_calibration", "skills_changed_fraction",
           "STALE_FRACTION"]

#: a saved map is stale once more than this fraction of the skills changed (added, removed,
#: new version or new examples): their score distribution is no longer the one it was fitted on
STALE_FRACTION = 0.25


@dataclass
class ConfidenceMap:
    """``confidence = sigmoid(w_score·score + w_margin·margin + bias)``.

    ``metrics`` holds what the fit measured (ece, auroc, counts); ``skills`` the skill
    signature it was fitted for (key -> number of examples) and ``encoder`` the encoder's
    fingerprint, used to tell when the map has gone stale."""

    w_score: float
    w_margin: float
    bias: float
    metrics: dict[str, Any] = field(default_factory=dict)
    skills: dict[str, int] = field(default_factory=dict)
    encoder: str | None = None
    fitted: float = 0.0
    source: str = "default"

    def __call__(self, score: Any, margin: Any) -> np.ndarray:
        """Confidence for arrays (or scalars) of scores and margins, float32 in [0, 1]."""
        z = self.w_score * np.asarray(score, np.float64) + self.w_margin * np.asarray(margin, np.float64)
        z = np.minimum(np.maximum(z + self.bias, -60.0), 60.0)   # exp stays finite
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def one(self, score: float, margin: float) -> float:
        """The same map for one (score, margin) in plain floats (the single-query routing path,
        where NumPy's per-call overhead would dominate); rounded to float32 like ``__call__``."""
        z = min(max(self.w_score * score + self.w_margin * margin + self.bias, -60.0), 60.0)
        return float(np.float32(1.0 / (1.0 + math.exp(-z))))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConfidenceMap":
        try:
            m = cls(w_score=float(d["w_score"]), w_margin=float(d["w_margin"]), bias=float(d["bias"]),
                    metrics=dict(d.get("metrics") or {}),
                    skills={str(k): int(v) for k, v in dict(d.get("skills") or {}).items()},
                    encoder=d.get("encoder"), fitted=float(d.get("fitted") or 0.0),
                    source=str(d.get("source") or "fitted"))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"calibration record is malformed ({type(exc).__name__}: {exc})") from None
        if not all(math.isfinite(v) for v in (m.w_score, m.w_margin, m.bias)):
            raise InputError("calibration record has non-finite coefficients")
        return m

    @classmethod
    def fit(cls, score: np.ndarray, margin: np.ndarray, label: np.ndarray, *,
            in_domain: np.ndarray | None = None, folds: int = 5, seed: int = 0) -> "ConfidenceMap":
        """Fit on routed examples: ``label`` 1 where the top skill was right. ``in_domain``
        marks texts that belong to some skill (for the AUROC); out-of-fold predictions give
        the reported ECE and AUROC."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        X = np.column_stack([np.asarray(score, np.float64), np.asarray(margin, np.float64)])
        y = np.asarray(label, np.int64)
        if len(X) != len(y) or X.shape[0] < 4:
            raise InputError(f"calibration needs at least 4 routed texts, got {len(y)}")
        if y.min() == y.max():
            raise InputError("calibration needs both right and wrong (or out-of-domain) routes; "
                             "give it negative texts and skills with at least two examples each")

        def model():
            # weak regularisation: two features, hundreds of points; lbfgs is deterministic
            return LogisticRegression(C=100.0, max_iter=1000)

        oof = np.empty(len(y))
        k = int(min(folds, np.bincount(y).min()))
        if k >= 2:
            for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y):
                oof[te] = model().fit(X[tr], y[tr]).predict_proba(X[te])[:, 1]
        full = model().fit(X, y)
        if k < 2:
            oof = full.predict_proba(X)[:, 1]
        metrics = {"ece": expected_calibration_error(oof, y), "accuracy_loo": float(y[
            in_domain.astype(bool)].mean()) if in_domain is not None and in_domain.any() else None,
                   "n": int(len(y)), "n_right": int(y.sum()), "folds": k}
        if in_domain is not None:
            metrics["auroc"] = auroc(oof, np.asarray(in_domain, np.int64))
            metrics["n_in_domain"] = int(np.sum(in_domain))
            metrics["n_negatives"] = int(len(y) - np.sum(in_domain))
        w = full.coef_[0]
        return cls(w_score=float(w[0]), w_margin=float(w[1]), bias=float(full.intercept_[0]),
                   metrics=metrics, fitted=time.time(), source="fitted")


#: fitted on route/data/tuning.json with the bundled MiniLM (see the module docstring)
DEFAULT_MAP = ConfidenceMap(w_score=12.27, w_margin=14.78, bias=-5.87, source="default")


def expected_calibration_error(prob: Sequence[float], label: Sequence[int], bins: int = 10) -> float:
    """ECE: the mean over ``bins`` equal-width confidence bins of |accuracy − mean confidence|,
    weighted by the fraction of samples in the bin."""
    p = np.asarray(prob, np.float64)
    y = np.asarray(label, np.float64)
    if p.size == 0:
        raise InputError("expected_calibration_error needs at least one prediction")
    idx = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(total)


def auroc(score: Sequence[float], label: Sequence[int]) -> float:
    """Area under the ROC curve (probability a random positive scores above a random negative,
    ties counting half); NaN when one class is missing."""
    s = np.asarray(score, np.float64)
    y = np.asarray(label, np.int64)
    pos, neg = s[y == 1], s[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([pos, neg]))
    return float((r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def general_negatives() -> list[str]:
    """The general out-of-domain corpus shipped with the package (``route/data/negatives.txt``):
    everyday questions and statements on many topics, one per line."""
    text = resources.files("aios_fast.route").joinpath("data/negatives.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def skills_changed_fraction(old: dict[str, int], new: dict[str, int]) -> float:
    """Fraction of skills (union of both signatures) added, removed or with a different example
    count."""
    keys = set(old) | set(new)
    if not keys:
        return 0.0
    changed = sum(1 for k in keys if old.get(k) != new.get(k))
    return changed / len(keys)


def save_calibration(path: str | Path, cmap: ConfidenceMap) -> Path:
    """Write ``cmap`` as JSON atomically."""
    return atomic_write_bytes(path, json.dumps(cmap.to_dict(), indent=1, sort_keys=True).encode())


def load_calibration(path: str | Path) -> ConfidenceMap | None:
    """Read a saved map; ``None`` if the file does not exist. Raises :class:`InputError` when it
    is unreadable."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{p}: calibration file is unreadable ({exc})") from None
    if not isinstance(d, dict):
        raise InputError(f"{p}: calibration file must hold a JSON object")
    return ConfidenceMap.from_dict(d)


def _fit_defaults() -> None:  # pragma: no cover - maintenance script, run by hand
    """Fit DEFAULT_MAP on route/data/tuning.json with the bundled MiniLM and print it."""
    from ..engines import SentenceEncoder
    from .router import LoRARouter

    data = json.loads(resources.files("aios_fast.route").joinpath("data/tuning.json").read_text("utf-8"))
    router = LoRARouter(SentenceEncoder())
    for name, d in data["domains"].items():
        router.add_skill(name, examples=d["examples"])
    rep = router.calibrate(negatives=general_negatives())
    print(json.dumps(rep, indent=1))
    m = router.confidence_map
    print(f"DEFAULT_MAP = ConfidenceMap(w_score={m.w_score:.2f}, w_margin={m.w_margin:.2f}, "
          f"bias={m.bias:.2f}, source='default')")
    # the held-out queries of the tuning set, routed with the fitted map
    qs = [(q, n) for n, d in data["domains"].items() for q in d["queries"]]
    rs = router.route_many([q for q, _ in qs] + data["out_of_domain"])
    conf = np.array([r.confidence for r in rs])
    right = np.array([r.ranked[0][0] == n for r, (_, n) in zip(rs, qs)] + [False] * len(data["out_of_domain"]))
    print("held-out tuning queries: ECE", expected_calibration_error(conf, right),
          "AUROC", auroc(conf, np.r_[np.ones(len(qs)), np.zeros(len(data["out_of_domain"]))]))


if __name__ == "__main__":  # pragma: no cover
    _fit_defaults()
