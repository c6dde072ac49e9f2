"""Model rotation: when a new release of the node's model appears, publish what changed as
incremental cards instead of shipping the whole model.

Steps (:func:`model_rotation`):

1. **convert** the new checkpoint to ArrowEngine's Parquet layout (``ModelConverter``), kept in
   ``workspace/models/<fingerprint>`` - the form every node already loads;
2. **probe** both models with each domain's benchmark queries against general text
   (``WeightMapProbe``, contrast score ``log(mean_norm_task / mean_norm_general)``): a module's
   *heat* says how specifically it responds to the domain;
3. **extract** the delta ``W_new − W_prev`` of the changed modules (relative Frobenius change
   above ``min_rel_change``), the hottest first (``top_k``), with ``LoRAExtractor`` under an
   energy budget (smallest rank keeping ``energy`` of ‖ΔW‖², at most ``max_rank``);
4. **compare** each module's factors with the previous release's card of the same domain:
   principal-angle subspace similarity of B·A computed from the factors (QR of B and Aᵀ, never
   forming ΔW; :mod:`aios_fast.factory.subspace`) and the ratio of the update norms;
5. **publish** a card with the modules that changed beyond the thresholds (similarity below
   ``similarity_threshold``, or norm ratio outside ``norm_band``, or no previous card), the
   comparison in its metadata (``rotation``); nothing when no module changed.

The report lists every module of every domain: heat on both models, relative change, rank and
energy kept, similarity to the previous card, and whether it was published (and why not).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import InputError

__all__ = ["model_rotation", "RotationReport", "ModuleRow"]

_GENERAL = Path(__file__).resolve().parent.parent / "probe" / "data" / "general.txt"


@dataclass
class ModuleRow:
    domain: str
    module: str
    heat: float
    heat_previous: float
    rel_change: float
    rank: int = 0
    energy: float | None = None
    similarity: float | None = None
    norm_ratio: float | None = None
    published: bool = False
    status: str = ""


@dataclass
class RotationReport:
    new_fingerprint: str
    previous_fingerprint: str
    converted: str
    cards: dict[str, str | None] = field(default_factory=dict)   # domain -> library key or None
    modules: list[ModuleRow] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def published(self) -> list[str]:
        return [k for k in self.cards.values() if k]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _encoder(model: Any):
    from ..engines import SentenceEncoder

    if isinstance(model, SentenceEncoder):
        return model
    if isinstance(model, (str, Path)):
        return SentenceEncoder(model)
    raise InputError(f"model_rotation: expected a SentenceEncoder or a sentence-transformers directory, "
                     f"got {type(model).__name__}")


def model_rotation(factory: Any, new_model: Any, previous_model: Any,
                   benchmark_queries: Sequence[str] | Mapping[str, Sequence[str]], *,
                   general_texts: Sequence[str] | None = None, top_k: int | None = None, energy: float = 0.9,
                   max_rank: int = 16, alpha: float | None = None, min_rel_change: float = 1e-4,
                   similarity_threshold: float = 0.9, norm_band: tuple[float, float] = (0.8, 1.25),
                   seed: int = 0) -> RotationReport:
    """See the module docstring. ``benchmark_queries``: texts, or domain name -> texts (one card
    per domain). Returns a :class:`RotationReport`; published cards are in ``factory.library``
    (origin ``extracted``) and were handed to ``factory.publish``."""
    from ..cards import LoRACard, fingerprint_model
    from ..engines import ModelConverter
    from ..extract import LoRAExtractor, open_source
    from ..probe import WeightMapProbe
    from .domains import slugify
    from .subspace import delta_norm, subspace_similarity

    t0 = time.perf_counter()
    if isinstance(benchmark_queries, Mapping):
        domains = {slugify(str(k)): list(v) for k, v in benchmark_queries.items()}
    else:
        domains = {"benchmark": list(benchmark_queries)}
    for d, qs in domains.items():
        if not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            raise InputError(f"benchmark_queries[{d!r}]: expected a non-empty list of non-empty strings")
    general = list(general_texts) if general_texts is not None else \
        [t for t in _GENERAL.read_text(encoding="utf-8").splitlines() if t.strip()]
    new_enc, prev_enc = _encoder(new_model), _encoder(previous_model)
    new_fp, prev_fp = fingerprint_model(new_enc.model), fingerprint_model(prev_enc.model)

    # 1. convert the new release (once per fingerprint)
    out = factory.workspace / "models" / new_fp.replace(":", "_")
    if not (out / "metadata.json").exists():
        ModelConverter.to_parquet(new_enc.model, out, {"fingerprint": new_fp, "source": str(getattr(new_enc, "path", ""))})
    tsrc = open_source(out, "new release")
    bsrc = open_source(prev_enc.model, "previous release")

    # relative change of every 2-D weight shared by both releases (streamed module by module)
    ex = LoRAExtractor(rank=max_rank, alpha=alpha or float(2 * max_rank), seed=seed)
    keys = ex.select_modules(tsrc, bsrc, None, None)
    rel: dict[str, float] = {}
    for k in keys:
        T, B = tsrc[k].to(torch.float64), bsrc[k].to(torch.float64)
        rel[k] = float(torch.linalg.vector_norm(T - B) / torch.linalg.vector_norm(B).clamp_min(1e-30))
    changed = [k for k in keys if rel[k] > min_rel_change]

    report = RotationReport(new_fingerprint=new_fp, previous_fingerprint=prev_fp, converted=str(out))
    for dname, queries in domains.items():
        # 2. heat on both releases: the domain's queries against general text
        heat_new = WeightMapProbe(new_enc).probe(queries, general).scores("contrast")
        heat_prev = WeightMapProbe(prev_enc).probe(queries, general).scores("contrast")
        hot = sorted(changed, key=lambda k: -heat_new.get(k, -math.inf))
        if top_k is not None:
            hot = hot[:top_k]
        rows = {k: ModuleRow(dname, k, heat_new.get(k, float("nan")), heat_prev.get(k, float("nan")), rel[k],
                             status="unchanged" if k not in changed else "cold (outside top_k)")
                for k in keys}
        report.modules.extend(rows[k] for k in keys)
        card_name = f"{dname}_release"
        if not hot:
            report.cards[dname] = None
            continue
        # 3. extract the hot modules' delta under the energy budget
        include = "^(" + "|".join(re.escape(k) for k in hot) + ")$"
        card = ex.extract_delta(out, prev_enc.model, energy=energy, max_rank=max_rank, include=include,
                                name=card_name, base_fingerprint=prev_fp)
        kept_energy = {r.key: r.energy for r in ex.last_results}
        # 4. compare with the previous release's card of this domain
        prev_card = None
        try:
            prev_card = factory.library.load_card(card_name)
        except Exception:  # noqa: BLE001 - no previous release of this domain yet
            prev_card = None
        publish_keys = []
        comparison: dict[str, dict[str, Any]] = {}
        for k in card.modules:
            row = rows[k]
            row.rank, row.energy = card.module_rank(k), kept_energy.get(k)
            A, Bm, s = card.weights_A[k], card.weights_B[k], card.scaling(k)
            if prev_card is not None and k in prev_card.modules:
                sim = subspace_similarity(Bm, A, prev_card.weights_B[k], prev_card.weights_A[k])
                ratio = delta_norm(Bm, A, s) / max(delta_norm(prev_card.weights_B[k], prev_card.weights_A[k],
                                                              prev_card.scaling(k)), 1e-30)
                row.similarity, row.norm_ratio = sim["similarity"], ratio
                moved = sim["similarity"] < similarity_threshold or not (norm_band[0] <= ratio <= norm_band[1])
                comparison[k] = {"similarity": round(sim["similarity"], 6), "left": round(sim["left"], 6),
                                 "right": round(sim["right"], 6), "norm_ratio": round(ratio, 6),
                                 "previous": prev_card.metadata.get("rotation_release", "?")}
            else:
                moved = True
                comparison[k] = {"similarity": None, "previous": None}
            if moved:
                publish_keys.append(k)
                row.status = "changed"
            else:
                row.status = f"same as previous release (similarity {row.similarity:.3f}, norm ratio {row.norm_ratio:.3f})"
        if not publish_keys:
            report.cards[dname] = None
            continue
        # 5. publish the modules that changed, with the comparison in the metadata
        meta = dict(card.metadata)
        meta.update({"description": f"{dname}: what changed from release {prev_fp} to {new_fp} "
                                    f"({len(publish_keys)} module(s))",
                     "rotation": json.dumps({k: {**comparison[k], "heat": round(rows[k].heat, 6),
                                                 "rel_change": rows[k].rel_change} for k in publish_keys},
                                            sort_keys=True),
                     "rotation_release": new_fp, "rotation_previous": prev_fp})
        sub = LoRACard(name=card_name, rank=card.rank, alpha=card.alpha, target_modules=publish_keys,
                       weights_A={k: card.weights_A[k] for k in publish_keys},
                       weights_B={k: card.weights_B[k] for k in publish_keys}, metadata=meta,
                       rank_pattern={k: r for k, r in card.rank_pattern.items() if k in publish_keys},
                       naming=card.naming, base_fingerprint=prev_fp)
        entry = factory.library.add(sub, examples=queries[:32], origin="extracted",
                                    metadata={"rotation_release": new_fp})
        if factory.publish is not None:
            factory.publish(entry)
        for k in publish_keys:
            rows[k].published = True
        report.cards[dname] = entry.key
    report.seconds = round(time.perf_counter() - t0, 3)
    return report
