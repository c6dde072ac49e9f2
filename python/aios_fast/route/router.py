"""``LoRARouter``: which skill serves a query, and how sure that is.

Scoring is one matrix product of the query embeddings with every example embedding of every
skill, then a per-skill reduction — the mean of the skill's top-``k`` example similarities
(k = 3), a nearest-neighbour vote that one odd example cannot swing — done on a padded
``(skills, max examples)`` view with ``topk``; no Python loop over skills. The score and the
margin to the runner-up go through a calibrated map (:mod:`aios_fast.route.calibrate`) to a
confidence: the probability that the top-ranked skill is the right one.

Skills without example texts (a card fetched without them) are scored by Arrow routing
(:mod:`aios_fast.route.arrow`): their score is the mean |cos| between the query's token hidden
states and the card's per-layer prototypes. That scale differs from the example cosine, so such
skills compete less reliably with example-backed ones; give skills examples where possible.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import CardFormatError, InputError
from ..kernels.route import RouteMatrix, skill_scores, top_k_rows
from .calibrate import (DEFAULT_MAP, STALE_FRACTION, ConfidenceMap, general_negatives,
                        load_calibration, save_calibration, skills_changed_fraction)
from .library import SkillLibrary, _clean_examples, encoder_fingerprint, valid_skill_name

if TYPE_CHECKING:  # pragma: no cover
    from ..cards import LoRACard

__all__ = ["LoRARouter", "RouteResult"]

_TOPK_EXAMPLES = 3          # per-skill reduction: mean of the best k example similarities
_MAX_ROUTING_EXAMPLES = 64  # per skill: more examples add cost, not accuracy
_CHUNK = 1024               # queries per matrix product in batch routing / calibration
_SCAN_BATCH = 16            # up to this many queries go through route_topk's scan; more share
                            # one matrix product, which reuses each example row across queries


@dataclass(frozen=True)
class RouteResult:
    """Where a query should go.

    Attributes:
        ranked: the top-k ``(skill name, score)`` pairs, best first (score: mean top-3 cosine
            to the skill's examples; Arrow score for example-less skills).
        confidence: calibrated probability in [0, 1] that ``ranked[0]`` is the right skill
            (0 for an empty router).
        margin: score gap between the best and the runner-up (the best score itself when there
            is no runner-up).
        skill: ``ranked[0]``'s name when ``confidence`` reaches the router's threshold, else None.
    """

    ranked: list[tuple[str, float]]
    confidence: float
    margin: float
    skill: str | None

    @property
    def score(self) -> float:
        """The top score (0.0 when nothing was ranked)."""
        return self.ranked[0][1] if self.ranked else 0.0

    @property
    def top(self) -> str | None:
        """The top-ranked name whatever the confidence (None when nothing was ranked)."""
        return self.ranked[0][0] if self.ranked else None

    def to_dict(self) -> dict[str, Any]:
        return {"ranked": [[n, s] for n, s in self.ranked], "confidence": self.confidence,
                "margin": self.margin, "skill": self.skill}


@dataclass
class _Skill:
    name: str
    texts: tuple[str, ...]                  # routing texts (examples, or the description)
    description: str = ""
    origin: str = "added"                   # "library", "added", "virtual", "card"
    key: str | None = None                  # library entry key
    prototypes: dict[str, torch.Tensor] | None = None   # Arrow routing (no texts)
    embeddings: np.ndarray | None = None    # (len(texts), d)


@dataclass
class _Index:
    """An immutable snapshot of the routing matrices (swapped whole: readers never lock)."""

    names: list[str] = field(default_factory=list)          # example-backed skills, index order
    M: RouteMatrix | None = None                             # their examples, grouped by skill
    topk: Any = None                                         # the chosen route_topk implementation
    arrow_names: list[str] = field(default_factory=list)
    arrow: Any = None                                        # ArrowIndex or None

    @property
    def E(self) -> np.ndarray | None:
        return None if self.M is None else self.M.E

    @property
    def uniform(self) -> bool:
        return self.M is not None and self.M.uniform

    @property
    def size(self) -> int:
        return len(self.names) + len(self.arrow_names)


def _mtime(path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class LoRARouter:
    """Routes queries to skills (see the module docstring for the method).

    Args:
        encoder: a :class:`SentenceEncoder` (L2-normalised embeddings).
        library: a :class:`SkillLibrary` (or its directory) whose resolved skills are routed
            (re-read by :meth:`refresh`); skills added with :meth:`add_skill` live beside them.
        threshold: the confidence at which ``RouteResult.skill`` is set.
    """

    def __init__(self, encoder: Any, library: SkillLibrary | str | None = None,
                 threshold: float = 0.5) -> None:
        if encoder is None or not hasattr(encoder, "encode"):
            raise InputError(f"LoRARouter needs a sentence encoder with .encode, got {type(encoder).__name__}")
        self.encoder = encoder
        if library is not None and not isinstance(library, SkillLibrary):
            library = SkillLibrary(library, encoder=encoder)
        if library is not None and library.encoder is None:
            library.encoder = encoder
        self.library = library
        self.threshold = self._check_threshold(threshold)
        self._lock = threading.RLock()
        self._skills: dict[str, _Skill] = {}
        self._library_skills: set[str] = set()
        self._index = _Index()
        self._fp: str | None = None
        self.confidence_map: ConfidenceMap = DEFAULT_MAP
        self.calibration_state = "default"   # "default", "fitted", "stale"
        self.problems: list[str] = []
        self._seen: tuple = ()
        if library is not None:
            self.refresh()

    # ------------------------------------------------------------------ skills
    @property
    def encoder_fp(self) -> str:
        if self._fp is None:
            self._fp = encoder_fingerprint(self.encoder)
        return self._fp

    @property
    def skills(self) -> list[str]:
        """Names of every routable skill, sorted."""
        return sorted(self._skills)

    def __len__(self) -> int:
        return len(self._skills)

    def __contains__(self, name: object) -> bool:
        return name in self._skills

    def add_skill(self, name: str, description: str | None = None,
                  examples: Iterable[str] = ()) -> None:
        """Add (or replace) a skill routed by its example texts; with no examples the
        description is its one routing text. Only this skill's texts are embedded."""
        valid_skill_name(name)
        exs = _clean_examples(examples, f"skill {name!r}")
        if description is not None and not isinstance(description, str):
            raise InputError(f"skill {name!r}: description must be a string")
        texts = exs or ((" ".join(description.split()),) if description and description.strip() else ())
        if not texts:
            raise InputError(f"skill {name!r}: give examples (texts the skill serves) or a "
                             f"description to route by")
        self._put(_Skill(name, texts, description or "", "added"))

    def add_skills(self, skills: Iterable[dict[str, Any]]) -> None:
        """Add (or replace) many skills with one index rebuild. Each item is a dict with
        ``name`` and ``examples`` (and optionally ``description``, and ``embeddings``: the
        examples' ``(n, d)`` L2-normalised embeddings from this router's encoder, e.g. cached
        by a library or computed in a batch; without them the examples are encoded)."""
        built = []
        for item in skills:
            if not isinstance(item, dict) or "name" not in item:
                raise InputError(f"add_skills: each skill is a dict with 'name' and 'examples', got {item!r:.80}")
            name = valid_skill_name(item["name"])
            exs = _clean_examples(item.get("examples"), f"skill {name!r}")[:_MAX_ROUTING_EXAMPLES]
            if not exs:
                raise InputError(f"skill {name!r}: add_skills needs examples")
            emb = item.get("embeddings")
            if emb is not None:
                emb = np.ascontiguousarray(np.asarray(emb, dtype=np.float32))
                if emb.ndim != 2 or emb.shape[0] < len(exs):
                    raise InputError(f"skill {name!r}: embeddings must be ({len(exs)}, d), got "
                                     f"{tuple(emb.shape)}")
                emb = emb[:len(exs)]
                if self._index.E is not None and emb.shape[1] != self._index.E.shape[1]:
                    raise InputError(f"skill {name!r}: embeddings have width {emb.shape[1]}, the "
                                     f"router's {self._index.E.shape[1]}")
                if not np.isfinite(emb).all():
                    raise InputError(f"skill {name!r}: embeddings contain NaN or infinity")
            built.append(_Skill(name, exs, str(item.get("description") or ""), "added", embeddings=emb))
        for s in built:
            if s.embeddings is None:
                s.embeddings = self._embed(list(s.texts)).numpy()
        with self._lock:
            merged = dict(self._skills)
            for s in built:
                merged[s.name] = s
                self._library_skills.discard(s.name)
            self._rebuild(merged)

    def register_virtual_candidate(self, name: str, description: str) -> None:
        """ArrowEngine's name: a skill known only by its description (no card yet)."""
        if not isinstance(description, str) or not description.strip():
            raise InputError(f"virtual candidate {name!r} needs a non-empty description")
        valid_skill_name(name)
        self._put(_Skill(name, (" ".join(description.split()),), description, "virtual"))

    def register_card(self, card: "LoRACard", examples: Iterable[str] | None = None,
                      description: str | None = None) -> None:
        """ArrowEngine's name: route to ``card``. Routing texts: ``examples``, else a JSON list
        in the card's ``examples`` metadata, else ``description``; a card with none of them is
        routed by its weights (Arrow prototypes)."""
        from ..cards import LoRACard

        if not isinstance(card, LoRACard):
            raise InputError(f"register_card takes a LoRACard, got {type(card).__name__}")
        name = valid_skill_name(card.name)
        texts = _clean_examples(examples, f"card {name!r}") if examples is not None else ()
        if not texts and card.metadata.get("examples"):
            try:
                texts = _clean_examples(json.loads(card.metadata["examples"]), f"card {name!r}")
            except (json.JSONDecodeError, InputError) as exc:
                raise CardFormatError(f"card {name!r}: metadata 'examples' must be a JSON list of "
                                      f"strings ({exc})") from None
        if not texts and description and description.strip():
            texts = (" ".join(description.split()),)
        if texts:
            self._put(_Skill(name, texts, description or "", "card"))
        else:
            self._put(_Skill(name, (), description or "", "card", prototypes=self._prototypes(card)))

    def remove_skill(self, name: str) -> None:
        """Stop routing to ``name`` (the library, if any, is not changed). Raises
        :class:`InputError` for an unknown name."""
        with self._lock:
            if name not in self._skills:
                raise InputError(f"no skill named {name!r} is routed; routed: {self.skills[:10]}")
            skills = dict(self._skills)
            del skills[name]
            self._library_skills.discard(name)
            self._rebuild(skills)

    def refresh(self, force: bool = False) -> bool:
        """Re-read the library if it changed (in this process or another): its resolved skills
        replace the previously loaded ones (skills added with :meth:`add_skill` stay).
        Unchanged skills are not re-embedded; damaged entries are reported in :attr:`problems`
        and skipped. Also reloads the saved calibration and checks whether it is stale.
        Returns True when the routing index was rebuilt."""
        if self.library is None:
            return False
        lib = self.library
        lib.refresh()
        cal = _mtime(lib.calibration_path)
        if not force and (lib.generation, cal) == self._seen:
            return False
        problems = list(lib.problems)
        with self._lock:
            self._seen = (lib.generation, cal)
            skills = {n: s for n, s in self._skills.items() if n not in self._library_skills}
            loaded = set()
            for e in lib.list():
                old = self._skills.get(e.name)
                if old is not None and old.key == e.key and old.origin == "library":
                    skills[e.name] = old
                    loaded.add(e.name)
                    continue
                try:
                    if e.examples:
                        texts = e.examples[:_MAX_ROUTING_EXAMPLES]
                        s = _Skill(e.name, texts, e.description, "library", e.key,
                                   embeddings=lib.embed_texts(texts, self.encoder))
                    else:
                        card = lib.load_card(e)
                        s = _Skill(e.name, (), e.description, "library", e.key,
                                   prototypes=self._prototypes(card))
                except (CardFormatError, InputError, OSError) as exc:
                    problems.append(f"skill {e.key} is not routed: {exc}")
                    continue
                skills[e.name] = s
                loaded.add(e.name)
            self._library_skills = loaded
            self._rebuild(skills)
            self.problems = problems
            self._load_calibration()
        return True

    # ------------------------------------------------------------------ routing
    def route(self, query: str, top_k: int = 3) -> RouteResult:
        """Route one query (see :class:`RouteResult`). An empty router returns
        ``RouteResult([], 0.0, 0.0, None)``."""
        if not isinstance(query, str):
            raise InputError(f"query must be a string, got {type(query).__name__}")
        return self.route_many([query], top_k=top_k)[0]

    def route_many(self, queries: Sequence[str], top_k: int = 3) -> list[RouteResult]:
        """Route a batch of queries: one encoder pass, one matrix product per 1024 queries."""
        qs = self.encoder._as_list(queries) if hasattr(self.encoder, "_as_list") else list(queries)
        idx = self._index
        if not qs:
            return []
        if idx.arrow is not None:
            from .arrow import encode_with_hidden

            E, hidden = encode_with_hidden(self.encoder, qs, idx.arrow.modules)
            arrow_scores = idx.arrow.score(hidden).numpy()
            return self._route(E.numpy(), top_k, idx, arrow_scores)
        return self._route(self.encoder.encode(qs).numpy(), top_k, idx)

    def route_embeddings(self, E: Any, top_k: int = 3) -> list[RouteResult]:
        """Route already-encoded queries: ``E`` is ``(n, d)`` (or ``(d,)``), L2-normalised rows
        from the router's encoder. Example-less (Arrow) skills need token states and are left
        out here; use :meth:`route` for them."""
        if isinstance(E, torch.Tensor):
            E = E.detach().cpu().numpy()
        E = np.asarray(E, dtype=np.float32)
        if E.ndim == 1:
            E = E[None, :]
        if E.ndim != 2:
            raise InputError(f"route_embeddings takes an (n, d) array, got shape {tuple(E.shape)}")
        idx = self._index
        if idx.E is not None and E.shape[1] != idx.E.shape[1]:
            raise InputError(f"query embeddings have width {E.shape[1]}, the skills' embeddings "
                             f"{idx.E.shape[1]}: they come from another encoder")
        return self._route(E, top_k, idx, None)

    def select(self, query: str, threshold: float = 0.6, top_k: int = 1) -> list[str]:
        """ArrowEngine's name: up to ``top_k`` skill names whose score (cosine to the skill's
        examples) reaches ``threshold``, best first."""
        r = self.route(query, top_k=top_k)
        return [n for n, s in r.ranked if s >= threshold]

    def scores(self, E: torch.Tensor) -> torch.Tensor:
        """Per-skill scores ``(n, S)`` of already-encoded queries against the example-backed
        skills (order: :attr:`example_skills`)."""
        if isinstance(E, torch.Tensor):
            E = E.detach().cpu().numpy()
        return torch.from_numpy(self._scores(np.asarray(E, np.float32), self._index))

    @property
    def example_skills(self) -> list[str]:
        """Skills routed by example texts, in score-column order."""
        return list(self._index.names)

    @property
    def needs_token_states(self) -> bool:
        """True when some skill is routed by Arrow prototypes (route() then reads token
        states; route_embeddings() cannot score those skills)."""
        return self._index.arrow is not None

    # ------------------------------------------------------------------ calibration
    def calibrate(self, negatives: Sequence[str] | None = None, *, save: bool = True,
                  max_examples: int = 5000, seed: int = 0) -> dict[str, Any]:
        """Fit the confidence map on leave-one-out routes of the skills' own examples plus
        ``negatives`` (default: the general corpus the package ships), store it in the library
        (``calibration.json``) when there is one and ``save``, and return its metrics:
        ``ece`` (10 bins) and ``auroc`` (some skill vs none) from out-of-fold predictions,
        plus counts."""
        negs = general_negatives() if negatives is None else _clean_examples(negatives, "negatives")
        if not negs:
            raise InputError("calibrate needs negative texts (that belong to no skill)")
        idx = self._index
        if len(idx.names) < 2:
            raise InputError(f"calibrate needs at least 2 skills with examples; the router has "
                             f"{len(idx.names)}")
        score, margin, label = self._loo(idx, max_examples, seed)
        En = self._embed(list(negs)).numpy()
        top, second = self._top2(self._scores(En, idx))
        nscore, nmargin = top, top - second
        cmap = ConfidenceMap.fit(np.r_[score, nscore], np.r_[margin, nmargin],
                                 np.r_[label, np.zeros(len(nscore), np.int64)],
                                 in_domain=np.r_[np.ones(len(score)), np.zeros(len(nscore))], seed=seed)
        cmap.skills = self._signature()
        cmap.encoder = self.encoder_fp
        with self._lock:
            self.confidence_map = cmap
            self.calibration_state = "fitted"
        if save and self.library is not None:
            save_calibration(self.library.calibration_path, cmap)
        return dict(cmap.metrics)

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_threshold(t: float) -> float:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise InputError(f"threshold must be a number in [0, 1], got {t!r}")
        return float(t)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        if self.library is not None:
            return torch.from_numpy(self.library.embed_texts(texts, self.encoder))
        return self.encoder.encode(texts)

    def _prototypes(self, card: "LoRACard") -> dict[str, torch.Tensor]:
        from .arrow import card_prototypes

        return card_prototypes(card)

    def _put(self, skill: _Skill) -> None:
        if skill.texts and skill.embeddings is None:
            skill.embeddings = self._embed(list(skill.texts[:_MAX_ROUTING_EXAMPLES])).numpy()
            skill.texts = skill.texts[:_MAX_ROUTING_EXAMPLES]
        with self._lock:
            skills = dict(self._skills)
            skills[skill.name] = skill
            self._library_skills.discard(skill.name)
            self._rebuild(skills)

    def _rebuild(self, skills: dict[str, _Skill]) -> None:
        """Build a new index from already-embedded skills (concatenation, no encoding)."""
        ex = [s for s in skills.values() if s.embeddings is not None and len(s.embeddings)]
        ar = [s for s in skills.values() if s.prototypes is not None]
        ex.sort(key=lambda s: s.name)
        ar.sort(key=lambda s: s.name)
        idx = _Index(names=[s.name for s in ex], arrow_names=[s.name for s in ar])
        if ex:
            counts = np.array([len(s.embeddings) for s in ex], dtype=np.int64)
            idx.M = RouteMatrix(np.concatenate([s.embeddings for s in ex]), counts)
            from .. import backends

            idx.topk = backends.choose("route_topk", "cpu")[0].fn
        if ar:
            from .arrow import ArrowIndex

            idx.arrow = ArrowIndex({s.name: s.prototypes for s in ar})
        self._skills = skills
        self._index = idx

    def _scores(self, Q: np.ndarray, idx: _Index, exclude: np.ndarray | None = None) -> np.ndarray:
        """(n, S) mean-of-top-k example similarities. ``exclude``: (n,) example row to leave
        out per query (leave-one-out)."""
        if idx.M is None:
            return np.zeros((Q.shape[0], 0), np.float32)
        return skill_scores(idx.M, Q, _TOPK_EXAMPLES, exclude)

    @staticmethod
    def _top2(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, S = scores.shape
        if S == 0:
            return np.zeros(n, np.float32), np.zeros(n, np.float32)
        if S == 1:
            return scores[:, 0], np.zeros(n, np.float32)
        v = np.partition(scores, S - 2, axis=1)
        return v[:, S - 1], v[:, S - 2]

    def _route(self, E: np.ndarray, top_k: int, idx: _Index,
               arrow_scores: np.ndarray | None = None) -> list[RouteResult]:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be an int >= 1, got {top_k!r}")
        n = E.shape[0]
        names = idx.names
        S = len(names) + (len(idx.arrow_names) if arrow_scores is not None else 0)
        if S == 0:
            return [RouteResult([], 0.0, 0.0, None) for _ in range(n)]
        k = min(max(top_k, 2), S)
        if arrow_scores is None and n <= _SCAN_BATCH:
            # the common case (one query, example-backed skills): the exact top-k straight from
            # the compiled scan, without forming the (n, S) score matrix
            ids, vals = idx.topk(idx.M, np.ascontiguousarray(E, dtype=np.float32), _TOPK_EXAMPLES, k)
        else:
            if not np.isfinite(E).all():
                raise InputError("query embeddings contain NaN or infinity")
            parts = []
            if idx.names:
                parts.append(self._scores(E, idx) if n <= _CHUNK else np.concatenate(
                    [self._scores(E[i:i + _CHUNK], idx) for i in range(0, n, _CHUNK)]))
            if arrow_scores is not None and idx.arrow_names:
                parts.append(np.asarray(arrow_scores, np.float32))
                names = names + idx.arrow_names
            ids, vals = top_k_rows(np.concatenate(parts, 1) if len(parts) > 1 else parts[0], k)
        thr, cmap = self.threshold, self.confidence_map
        if n == 1:
            # one query: plain floats (NumPy's per-call overhead dominates at this size)
            v, ids0 = vals[0].tolist(), ids[0].tolist()
            margin = v[0] - (v[1] if k > 1 else 0.0)
            c = cmap.one(v[0], margin)
            ranked = [(names[j], x) for j, x in zip(ids0[:top_k], v[:top_k])]
            return [RouteResult(ranked, c, margin, ranked[0][0] if c >= thr else None)]
        s1 = vals[:, 0]
        margin = s1 - (vals[:, 1] if k > 1 else 0.0)
        conf = cmap(s1, margin)
        vals_l, ids_l = vals[:, :top_k].tolist(), ids[:, :top_k].tolist()
        margin_l, conf_l = margin.tolist(), conf.tolist()
        out = []
        for i in range(n):
            ranked = [(names[j], v) for j, v in zip(ids_l[i], vals_l[i])]
            c = conf_l[i]
            out.append(RouteResult(ranked, c, margin_l[i], ranked[0][0] if c >= thr else None))
        return out

    def _loo(self, idx: _Index, max_examples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Route (a sample of) every example with itself left out."""
        N = idx.E.shape[0]
        rows = np.arange(N)
        if N > max_examples:
            rows = np.sort(np.random.default_rng(seed).choice(N, max_examples, replace=False))
        owner = np.repeat(np.arange(len(idx.names)), idx.M.counts)
        score, margin, label = [], [], []
        for i in range(0, len(rows), _CHUNK):
            r = rows[i:i + _CHUNK]
            sc = self._scores(idx.E[r], idx, exclude=r)
            top, second = self._top2(sc)
            score.append(top)
            margin.append(top - second)
            label.append((sc.argmax(1) == owner[r]).astype(np.int64))
        return np.concatenate(score), np.concatenate(margin), np.concatenate(label)

    def _signature(self) -> dict[str, int]:
        return {(s.key or s.name): len(s.texts) for s in self._skills.values() if s.texts}

    def _load_calibration(self) -> None:
        """Use the library's saved map unless it is missing, unreadable or stale."""
        if self.library is None:
            return
        try:
            cmap = load_calibration(self.library.calibration_path)
        except InputError as exc:
            self.problems.append(str(exc))
            cmap = None
        if cmap is None:
            if self.calibration_state != "fitted":
                self.confidence_map, self.calibration_state = DEFAULT_MAP, "default"
            return
        if cmap.encoder != self.encoder_fp or skills_changed_fraction(
                cmap.skills, self._signature()) > STALE_FRACTION:
            # fitted for another encoder or a different skill set: its scores meant something else
            self.confidence_map, self.calibration_state = DEFAULT_MAP, "stale"
            return
        self.confidence_map, self.calibration_state = cmap, "fitted"

    def status(self) -> dict[str, Any]:
        """JSON-able summary: skills, calibration state and metrics, problems."""
        return {"skills": len(self._skills), "example_skills": len(self._index.names),
                "arrow_skills": len(self._index.arrow_names), "threshold": self.threshold,
                "calibration": self.calibration_state,
                "calibration_metrics": dict(self.confidence_map.metrics),
                "problems": list(self.problems)}

    def __repr__(self) -> str:
        return (f"LoRARouter(skills={len(self._skills)}, threshold={self.threshold}, "
                f"calibration={self.calibration_state!r})")
