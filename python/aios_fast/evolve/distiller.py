"""Learning a skill when no skill fits: Tier 2 (``CloudDistiller``) and the node's learner
(``SkillDistiller``) that tries Tier 1 sources, then Tier 2, then Tier 3.

``CloudDistiller.distill_topic`` (DESIGN.md, "The loop", Tier 2):

1. **ground**: the topic's queries search a :class:`~aios_fast.evolve.retrieval.DocumentIndex`
   (local folder, URLs) with the node's encoder; the best passages are the material;
2. **pairs**: teacher questions judged against their passage, inverse-cloze and cropping pairs
   (:mod:`aios_fast.evolve.pairs`), near-duplicates removed; every pair keeps its passage ids;
3. **log** every kept pair to the :class:`~aios_fast.learn.QALogger` (source = origin, teacher,
   passage ids) and flush, so a crash after this point loses no record;
4. **split** train / held-out (held-out: teacher questions and ICT sentences, never crops; by
   default whole passages the card never trains on, see ``DistillConfig.gate_heldout``);
5. **train** a LoRA with :class:`~aios_fast.learn.LoRATrainer` (``contrastive`` for encoders,
   ``sft`` for causal LMs);
6. **gate** with :func:`aios_fast.learn.validate` on the held-out pairs (all retrieved passages
   as distractors) and general guard texts;
7. **save** into the :class:`~aios_fast.route.library.SkillLibrary` with router examples, the
   validation report and the sources (path or URL + SHA-256) in the metadata; **publish** hooks.

Each step's outcome and timing goes into the result's report; no card is made when the data is
thin, the teacher is broken, training diverges or the gate fails, and the report says why.

``SkillDistiller`` journals each job (one JSON file per topic, written atomically) and stages the
gated card file before adding it to the library, so a process killed at any point neither loses
a finished card (the staged file is added on the next ``learn``) nor trains or adds it twice
(the library recognises identical bytes; QA records are de-duplicated by the logger).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .._atomic import atomic_write_bytes
from ..errors import AiosError, InputError, TrainingDivergedError
from .jobs import LearningRequest, LearnOutcome, SourceCandidate
from .pairs import Pair, PairSet, build_pairs

if TYPE_CHECKING:  # pragma: no cover
    from ..cards import LoRACard
    from ..route.library import SkillEntry, SkillLibrary

__all__ = ["CloudDistiller", "DistillResult", "DistillConfig", "SkillDistiller", "LibrarySource",
           "DistillJournal", "enable_evolution", "guard_texts", "skill_name_for"]

log = logging.getLogger(__name__)


def guard_texts() -> list[str]:
    """General sentences a domain skill should leave alone (the gate's drift check)."""
    path = Path(__file__).resolve().parents[1] / "learn" / "data" / "guard.txt"
    return [l.strip() for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def skill_name_for(queries: Sequence[str], topic_id: str | None = None) -> str:
    """A readable, valid skill name from a topic: its most frequent content words plus a short
    hash (``kestrel-battery-3f2a1c``)."""
    from .pairs import _STOP, _words

    counts: dict[str, int] = {}
    for q in queries:
        for w in set(_words(q)):
            if w not in _STOP and len(w) > 2 and w.isalpha():
                counts[w] = counts.get(w, 0) + 1
    top = sorted(counts, key=lambda w: (-counts[w], w))[:2]
    h = hashlib.sha256((topic_id or "\n".join(queries)).encode()).hexdigest()[:6]
    return "-".join(top + [h]) if top else f"skill-{h}"


#: what the gate's held-out questions may ask about (``DistillConfig.gate_heldout``)
GATE_HELDOUT = ("unseen", "studied", "questions")


@dataclass
class DistillConfig:
    """Defaults tuned on the bundled Kestrel demo domain (see ``evolve/demo``) and checked on a
    second domain by the tests.

    Args:
        max_passages: passages taken from retrieval for one topic.
        min_passage_score: passages scoring below this cosine with every topic query are left out.
        teacher_questions: teacher questions asked per topic (spread over the passages, at most
            ``max_questions_per_passage`` each); ``num_pairs`` of ``distill_topic`` overrides it.
        ict_per_passage, crops_per_passage: document pairs per passage.
        min_pairs: fewer kept pairs than this is "thin data": no card.
        min_teacher_pairs: with a teacher, fewer kept teacher questions than this means the
            teacher is broken or useless: no card (a configured teacher that fails is reported,
            never silently ignored).
        gate_heldout: what the gate's held-out questions ask about. ``"questions"`` (default):
            teacher questions about the passages the skill learns, never trained on (their
            passages still are, by their other pairs): a skill for a topic's documents is for
            new questions about those documents, which is what users ask and what the
            human-written evaluations measure. Without teacher questions (document pairs only)
            the gate falls back to ``"unseen"``. ``"unseen"``: whole passages held out, so the
            card must carry to documents it never trained on; on both domains the cards helped
            users while their gain on unseen passages stayed within noise (BENCHMARKS.md).
            ``"studied"``: ``"questions"`` plus one inverse-cloze sentence of every passage with
            two or more (its other sentences still train the card, the held-out one is not in
            the passage's answer text); those sentences are verbatim text of studied passages,
            and on the test domain this kept a card that left the human-written recall@1
            unchanged, so it is an option.
        heldout_fraction, min_heldout: the gate's held-out share (with ``gate_folds`` <= 1):
            of teacher and ICT pairs by passage (``"unseen"``) or of the teacher questions
            (``"questions"``, ``"studied"``); ``None``: 0.25 (``"unseen"``) or 0.33. Cross-fitting
            holds out every eligible question once.
        gate_folds: K-fold cross-fitting of the bootstrap gate (encoders): the held-out units
            are dealt into K folds (``"unseen"``: passages, a fold's card trained on nothing about
            them; ``"questions"``/``"studied"``: each passage's questions spread over the folds,
            so every fold's card still trains on the passage), and every eligible question is
            held out once. The pooled paired figures decide (``gate_statistic``, resampled by passage), and
            the card that is kept is trained on all pairs. One held-out share of a small topic
            is too few questions for a bound to clear 0 (BENCHMARKS.md, "Distillation"); the
            price is K extra trainings. ``<= 1``: a single ``heldout_fraction`` split.
        rank, alpha, lr, batch_size, target_modules: the LoRA training.
        epochs: ``None`` = enough epochs for ``min_steps`` optimiser steps (at least 3, at most
            ``max_epochs``): a small topic must still train long enough to change the model.
        margin, max_drift: the gate (``None``: :func:`aios_fast.learn.validate`'s defaults;
            with ``gate_rule="bootstrap"`` the margin is an optional floor on the mean MRR@10 gain).
        gate_rule: ``"bootstrap"`` (encoders): a paired bootstrap over the held-out passages at
            ``gate_confidence`` (``gate_resamples`` resamples) decides, so the margin scales with
            the held-out size; ``"margin"``: ``validate``'s fixed recall@1 margin.
        gate_statistic: what the bootstrap decides on: ``"loss"`` (default), the held-out
            contrastive loss's reduction, and MRR@10 must not fall; or ``"mrr"``, the MRR@10
            gain. The loss scores every question (MRR@10 moves only when a rank does: two
            thirds of the questions keep theirs), so it resolves a gain from fewer passages: on
            the demo the default recipe's cards cleared 0 by +0.20 to +0.75 (MRR@10: +0.004 to
            +0.155). Neither statistic is what stops an over-trained card whose lexical
            matching also helps the teacher's questions: the guard drift is
            (BENCHMARKS.md, "Distillation"). See ``_bootstrap_gate``.
        batching: the trainer's contrastive batching (``"unique"``: one pair per answer group
            in a batch; ``"grouped"``: whole answer groups, see :func:`aios_fast.learn.recipe.plan_batches`).
            ``"unique"`` measured better on the human-written eval of the demo (BENCHMARKS.md).
        length_buckets: the trainer's length buckets (``TrainConfig.length_buckets``): a batch
            pairs short questions with passages of any length, and embedding it in buckets of 4
            by length trained 1.2-1.5x faster per step on the demo than one padded batch
            (BENCHMARKS.md; the same loss, but other dropout draws than the trainer's default,
            so another seeded card).
        max_examples: router examples stored with the skill.
        seed: pairs, split and training.
    """

    max_passages: int = 64
    min_passage_score: float = 0.1
    teacher_questions: int = 120
    max_questions_per_passage: int = 3
    ict_per_passage: int = 3
    crops_per_passage: int = 0
    min_pairs: int = 24
    min_teacher_pairs: int = 3
    gate_heldout: str = "questions"
    heldout_fraction: float | None = None
    min_heldout: int = 8
    rank: int = 8
    alpha: float = 16.0
    epochs: int | None = None
    min_steps: int = 40
    max_epochs: int = 12
    lr: float = 1e-3
    batch_size: int = 16
    # pinned here (not the trainer's default, which other measurements may move): every
    # attention projection and feed-forward layer of the encoder, never the pooler
    target_modules: Any = (r"^(?!.*pooler).*\.(query|key|value|dense|q_proj|k_proj|v_proj|o_proj|"
                           r"q_lin|k_lin|v_lin|out_lin|lin1|lin2|gate_proj|up_proj|down_proj)$")
    margin: float | None = None
    max_drift: float | None = None
    max_examples: int = 64
    seed: int = 0
    gate_rule: str = "bootstrap"
    gate_confidence: float = 0.95
    gate_resamples: int = 2000
    gate_statistic: str = "loss"
    gate_folds: int = 4
    batching: str = "unique"
    length_buckets: int | None = 4

    def __post_init__(self) -> None:
        for name in ("max_passages", "min_pairs", "min_heldout", "rank", "batch_size", "max_examples",
                     "min_steps", "max_epochs") + tuple(
                         n for n in ("epochs", "length_buckets") if getattr(self, n) is not None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"DistillConfig.{name}: expected an int >= 1, got {v!r}")
        for name in ("teacher_questions", "max_questions_per_passage", "ict_per_passage", "crops_per_passage", "min_teacher_pairs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InputError(f"DistillConfig.{name}: expected an int >= 0, got {v!r}")
        if self.gate_rule not in ("bootstrap", "margin"):
            raise InputError(f"DistillConfig.gate_rule: expected 'bootstrap' or 'margin', got {self.gate_rule!r}")
        if not 0.5 <= self.gate_confidence < 1.0:
            raise InputError(f"DistillConfig.gate_confidence: expected a number in [0.5, 1), got {self.gate_confidence!r}")
        if isinstance(self.gate_folds, bool) or not isinstance(self.gate_folds, int) or self.gate_folds < 0:
            raise InputError(f"DistillConfig.gate_folds: expected an int >= 0 (<= 1: one split), got {self.gate_folds!r}")
        if isinstance(self.gate_resamples, bool) or not isinstance(self.gate_resamples, int) or self.gate_resamples < 100:
            raise InputError(f"DistillConfig.gate_resamples: expected an int >= 100, got {self.gate_resamples!r}")
        if self.gate_heldout not in GATE_HELDOUT:
            raise InputError(f"DistillConfig.gate_heldout: expected one of {', '.join(map(repr, GATE_HELDOUT))}, "
                             f"got {self.gate_heldout!r}")
        if self.gate_statistic not in ("loss", "mrr"):
            raise InputError(f"DistillConfig.gate_statistic: expected 'loss' or 'mrr', got {self.gate_statistic!r}")
        if self.batching not in ("unique", "grouped", "random"):
            raise InputError(f"DistillConfig.batching: expected 'unique', 'grouped' or 'random', got {self.batching!r}")
        if self.heldout_fraction is not None and not (isinstance(self.heldout_fraction, (int, float))
                                                      and 0.0 < self.heldout_fraction < 1.0):
            raise InputError(f"DistillConfig.heldout_fraction: expected None or a number in (0, 1), "
                             f"got {self.heldout_fraction!r}")

    @property
    def heldout_share(self) -> float:
        """``heldout_fraction``, or the share measured for ``gate_heldout`` when it is ``None``."""
        if self.heldout_fraction is not None:
            return float(self.heldout_fraction)
        return 0.25 if self.gate_heldout == "unseen" else 0.33


@dataclass
class DistillResult:
    """What a distillation produced: the card and its library entry (``None`` when no skill was
    kept) and the full report (JSON-able; ``report["reason"]`` says why when there is no card)."""

    card: "LoRACard | None"
    entry: "SkillEntry | None"
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.card is not None

    @property
    def reason(self) -> str | None:
        return self.report.get("reason")


class _NoCard(Exception):
    """Internal: stop the pipeline with a reason (becomes ``report["reason"]``)."""


class CloudDistiller:
    """Tier 2: distil a skill for a topic from a teacher and documents.

    Args:
        engine: the model the skill is for: a ``SentenceEncoder`` (contrastive training), a
            ``CausalLM`` (sft), or a ``SkillNode`` (its encoder and library are used).
        library: where kept skills go (default: the node's library, else none: the card is
            returned but not stored).
        logger: a :class:`~aios_fast.learn.QALogger` (or a directory for one) that records
            every kept pair; ``None``: not logged.
        config: a :class:`DistillConfig` (or a dict of its fields).
        index: a ready :class:`~aios_fast.evolve.retrieval.DocumentIndex` to ground on.
        guard: the gate's general texts (default :func:`guard_texts`).
        progress: show rich progress bars for the teacher and the training.
        on_event: ``on_event(stage, info_dict)`` after each stage (the CLI draws from it).
    """

    def __init__(self, engine: Any, library: "SkillLibrary | None" = None, logger: Any = None, *,
                 config: DistillConfig | dict | None = None, index: Any = None,
                 guard: Sequence[str] | None = None, progress: bool = False,
                 on_event: Callable[[str, dict], None] | None = None) -> None:
        node = engine if hasattr(engine, "encoder") and hasattr(engine, "library") else None
        self.node = node
        self.engine = node.encoder if node is not None else engine
        if not (hasattr(self.engine, "model") and hasattr(self.engine, "tokenizer")):
            raise InputError(f"engine must be a SentenceEncoder, CausalLM or SkillNode, got {type(engine).__name__}")
        self.kind = "encoder" if hasattr(self.engine, "encode") and hasattr(self.engine, "pooling") else "causal"
        self.library = library if library is not None else (node.library if node is not None else None)
        if isinstance(logger, (str, Path)):
            from ..learn.qa_logger import QALogger

            logger = QALogger(logger)
        self.logger = logger
        self.config = config if isinstance(config, DistillConfig) else DistillConfig(**(config or {}))
        self.index = index
        self.guard = list(guard) if guard is not None else guard_texts()
        self.progress = progress
        self.on_event = on_event
        self.publish_hooks: list[Callable[[Any], None]] = []
        self._retrieval_encoder = None
        self._grounded: set[str] = set()
        self.last_training = None   # TrainingReport of the last run (loss curve for the CLI)

    # ------------------------------------------------------------------ public
    def distill_topic(self, topic: str | Sequence[str], provider: Any = None, num_pairs: int | None = None,
                      docs: str | Path | Sequence[str | Path] | None = None,
                      urls: str | Sequence[str] | None = None, skill_name: str | None = None, *,
                      examples: Sequence[str] | None = None, stage: Callable[["LoRACard", dict], Path] | None = None
                      ) -> DistillResult:
        """Distil a skill for ``topic`` (a query or the topic's queries).

        Args:
            topic: one query or several (the trigger's topic).
            provider: a teacher (``OpenAICompatibleProvider``, ``LocalTeacher``) or ``None`` for
                document-only pairs.
            num_pairs: teacher questions to ask at most (default ``config.teacher_questions``).
            docs, urls: grounding added to the index (folders/files; web pages).
            skill_name: the card's name (default :func:`skill_name_for`).
            examples: router examples (default: the topic queries plus kept teacher questions).
            stage: called with the gated card and the library-add arguments before the card is
                added; returns the path of the staged card file, which is what gets added (used
                by :class:`SkillDistiller`'s journal).
        Returns: a :class:`DistillResult`.
        """
        queries = [topic] if isinstance(topic, str) else [q for q in topic]
        if not queries or not all(isinstance(q, str) and q.strip() for q in queries):
            raise InputError(f"topic must be a non-empty query or list of queries, got {topic!r:.100}")
        from ..route.library import valid_skill_name

        name = valid_skill_name(skill_name or skill_name_for(queries))
        cfg = self.config
        report: dict[str, Any] = {"skill": name, "topic": queries[:20], "n_queries": len(queries),
                                  "teacher": _teacher_name(provider), "objective":
                                  "contrastive" if self.kind == "encoder" else "sft",
                                  "timings": {}, "stages": []}
        t_all = time.perf_counter()
        card = entry = None
        try:
            passages, sources = self._ground(queries, docs, urls, report)
            pairs = self._pairs(passages, provider, num_pairs, report)
            self._log_pairs(pairs, name, report)
            gate_cfg = self._gate_config(pairs)
            if self._crossfitting():
                card = self._crossfit(pairs, passages, name, report, gate_cfg)
            else:
                train, heldout, distractors = self._split(pairs, passages, report, gate_cfg)
                card = self._train(train, name, report)
                self._gate(card, heldout, distractors, report, gate_cfg)
            card = self._describe(card, queries, passages, sources, pairs, provider, report)
            entry = self._save(card, queries, pairs, examples, report, stage)
        except _NoCard as why:
            report["reason"] = str(why)
            card = entry = None
        report["passed"] = card is not None
        report["timings"]["total"] = round(time.perf_counter() - t_all, 3)
        self._emit("done", {"passed": card is not None, "reason": report.get("reason")})
        return DistillResult(card, entry, report)

    def distill_from_cloud(self, query_or_queries: str | Sequence[str], provider: Any = None,
                           **kwargs: Any) -> DistillResult:
        """The seed's name: :meth:`distill_topic` for one query or a list of queries."""
        return self.distill_topic(query_or_queries, provider, **kwargs)

    # ------------------------------------------------------------------ stages
    def _emit(self, stage: str, info: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(stage, info)
            except Exception as exc:  # a display callback must not break learning
                log.warning("on_event(%s) failed: %s", stage, exc)

    def _stage(self, report: dict, name: str, t0: float, **info: Any) -> None:
        secs = round(time.perf_counter() - t0, 3)
        report["timings"][name] = secs
        report["stages"].append({"stage": name, "seconds": secs, **info})
        self._emit(name, {"seconds": secs, **info})

    def _encoder(self):
        """The encoder used for retrieval and judging: the engine itself for encoders; the
        bundled MiniLM for causal models."""
        if self.kind == "encoder":
            return self.engine
        if self._retrieval_encoder is None:
            from ..engines import SentenceEncoder

            self._retrieval_encoder = SentenceEncoder()
        return self._retrieval_encoder

    def _ground(self, queries, docs, urls, report):
        t0 = time.perf_counter()
        from .retrieval import DocumentIndex

        if self.index is None:
            self.index = DocumentIndex(self._encoder())
        added = 0
        for d in ([] if docs is None else [docs] if isinstance(docs, (str, Path)) else list(docs)):
            key = f"docs:{Path(d).resolve()}"
            if key in self._grounded:
                continue
            p = Path(d)
            if not p.exists():
                raise InputError(f"docs: {p} does not exist; pass a folder of .txt/.md files")
            added += self.index.add_folder(p) if p.is_dir() else \
                self.index.add_text(p.read_text(encoding="utf-8"), str(p),
                                    kind="markdown" if p.suffix.lower() in (".md", ".markdown") else "text")
            self._grounded.add(key)
        url_list = [] if urls is None else [urls] if isinstance(urls, str) else list(urls)
        new_urls = [u for u in url_list if f"url:{u}" not in self._grounded]
        if new_urls:
            added += self.index.add_urls(new_urls)
            self._grounded.update(f"url:{u}" for u in new_urls)
        if len(self.index) == 0:
            raise _NoCard("no grounding: no passages from docs/urls (pass docs= a folder of .txt/.md "
                          "files or urls=); a teacher is asked about passages, never for bare facts")
        hits = self.index.search(queries, k=min(self.config.max_passages, len(self.index)))
        passages = [p for p, s in hits if s >= self.config.min_passage_score]
        used = {p.source_hash for p in passages}
        sources = [{"source": s["source"], "hash": s["hash"], "kind": s.get("kind", "")}
                   for s in self.index.sources if s["hash"] in used]
        report["grounding"] = {"passages_in_index": len(self.index), "passages_used": len(passages),
                               "sources": sources, "problems": list(getattr(self.index, "problems", []))[:10]}
        self._stage(report, "ground", t0, passages=len(passages), sources=len(sources))
        if len(passages) < 2:
            raise _NoCard(f"thin data: only {len(passages)} passage(s) match the topic "
                          f"(min score {self.config.min_passage_score})")
        return passages, sources

    def _pairs(self, passages, provider, num_pairs, report) -> PairSet:
        t0 = time.perf_counter()
        cfg = self.config
        use = passages
        if num_pairs is None:
            num_pairs = cfg.teacher_questions
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 0:
            raise InputError(f"num_pairs: expected an int >= 0, got {num_pairs!r}")
        per = min(cfg.max_questions_per_passage, max(1, -(-num_pairs // len(passages)))) if num_pairs else 0
        bar, task = None, None
        if provider is not None and per and self.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            bar = Progress(TextColumn("  teacher questions"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=True)
            bar.start()
            total = min(num_pairs, len(use) * per)
            task = bar.add_task("ask", total=total)
        try:
            ps = build_pairs(use, self._encoder(), provider, questions_per_passage=per if provider else 0,
                             max_teacher_requests=num_pairs,
                             ict_per_passage=cfg.ict_per_passage, crops_per_passage=cfg.crops_per_passage,
                             pool=self.index.passages, seed=cfg.seed,
                             on_step=(lambda n: bar.advance(task, n)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.stop()
        report["pairs"] = ps.report_dict()
        kept_teacher = ps.by_origin().get("teacher", 0)
        self._stage(report, "pairs", t0, total=len(ps.pairs), kept=ps.by_origin(),
                    asked=ps.asked, rejected=dict(ps.rejected))
        if provider is not None and kept_teacher < cfg.min_teacher_pairs:
            why = (f"errors: {ps.teacher_errors[0]}" if ps.teacher_errors else
                   "rejected: " + ", ".join(f"{k} {v}" for k, v in ps.rejected.most_common(4)) or "no replies")
            raise _NoCard(f"teacher {_teacher_name(provider)} gave {kept_teacher} usable question(s) of "
                          f"{ps.asked} asked (need {cfg.min_teacher_pairs}); {why}")
        if len(ps.pairs) < cfg.min_pairs:
            raise _NoCard(f"thin data: {len(ps.pairs)} usable pairs, need at least {cfg.min_pairs}")
        return ps

    def _log_pairs(self, ps: PairSet, name: str, report) -> None:
        if self.logger is None:
            report["qa_logged"] = 0
            return
        t0 = time.perf_counter()
        teacher = report.get("teacher") or "none"
        new = 0
        for p in ps.pairs:
            src = f"distill:{p.origin}:{teacher}|" + ",".join(p.passage_ids)
            new += bool(self.logger.log(p.query, p.answer, source=src[:256], domain=name))
        self.logger.flush()   # durable before training starts: a crash loses no record
        report["qa_logged"] = new
        self._stage(report, "log", t0, logged=new, duplicates=len(ps.pairs) - new)

    def _gate_config(self, ps: PairSet) -> DistillConfig:
        """The config the gate runs with: ``gate_heldout="questions"`` needs teacher questions;
        without any (no teacher, document pairs only) there is nothing to ask about the studied
        passages, so the gate holds out unseen passages instead (the report says which it used)."""
        cfg = self.config
        if cfg.gate_heldout == "questions" and not any(p.origin == "teacher" for p in ps.pairs):
            return dc_replace(cfg, gate_heldout="unseen")
        return cfg

    def _split(self, ps: PairSet, passages, report, cfg: DistillConfig | None = None):
        cfg = cfg or self.config
        rng = random.Random(cfg.seed)
        eligible = _eligible(ps, cfg.gate_heldout)
        held_passages: set[str] = set()
        if cfg.gate_heldout != "unseen":
            held = _studied_heldout(ps, eligible, cfg.heldout_share, rng)
            if len(held) < cfg.min_heldout:
                raise _NoCard(f"thin data: {len(held)} held-out question(s) about passages that keep other "
                              f"training pairs ({len(eligible)} question-like pairs), need {cfg.min_heldout} "
                              f"for the gate")
        else:
            rng.shuffle(eligible)
            n = max(cfg.min_heldout, int(round(cfg.heldout_share * len(eligible))))
            if len(eligible) < n + 2:
                raise _NoCard(f"thin data: {len(eligible)} question-like pairs, need {n + 2} to hold out {n} "
                              f"for the gate")
            by_passage = _questions_by_passage(ps, eligible)
            order = sorted(by_passage)
            rng.shuffle(order)
            held = set()
            for pid in order:
                if len(held) >= n:
                    break
                held_passages.add(pid)
                held.update(by_passage[pid])
        heldout = [ps.pairs[i] for i in sorted(held)]
        train = [p for i, p in enumerate(ps.pairs)
                 if i not in held and not (set(p.passage_ids) & held_passages)]
        if len(train) < 2:
            raise _NoCard(f"thin data: {len(train)} training pairs left after holding out "
                          f"{len(heldout)} question(s) for the gate")
        distractors = _distractors(ps, passages, heldout)
        report["split"] = {"train": len(train), "heldout": len(heldout), "distractors": len(distractors),
                           "heldout_by_origin": _count(p.origin for p in heldout),
                           "gate_heldout": cfg.gate_heldout}
        return train, heldout, distractors

    def _epochs(self, train: list[Pair]) -> int:
        cfg = self.config
        if cfg.epochs is not None:
            return cfg.epochs
        if cfg.batching == "grouped":   # whole answer groups per batch
            per_epoch = max(1, round(len({p.answer for p in train}) / cfg.batch_size))
        else:
            per_epoch = max(1, len(train) // min(cfg.batch_size, len(train)))
        return min(cfg.max_epochs, max(3, -(-cfg.min_steps // per_epoch)))

    def _fit(self, train: list[Pair], name: str, report, key: str = "training"):
        """Train one card on ``train``; a diverged run is a reason for no card."""
        from ..learn.trainer import LoRATrainer

        cfg = self.config
        try:
            return LoRATrainer(self.engine).train(
                [(p.query, p.answer) for p in train], rank=cfg.rank, alpha=cfg.alpha, epochs=self._epochs(train),
                lr=cfg.lr, batch_size=cfg.batch_size, target_modules=cfg.target_modules, seed=cfg.seed,
                name=name, progress=self.progress, batching=cfg.batching, length_buckets=cfg.length_buckets)
        except TrainingDivergedError as exc:
            report[key] = getattr(exc, "report", None) and exc.report.to_dict()
            raise _NoCard(str(exc)) from None

    def _train(self, train: list[Pair], name: str, report):
        t0 = time.perf_counter()
        self._emit("train_start", {"pairs": len(train), "epochs": self._epochs(train)})
        card, tr = self._fit(train, name, report)
        self.last_training = tr
        report["training"] = {k: v for k, v in tr.to_dict().items() if k != "config"}
        self._stage(report, "train", t0, steps=tr.steps, final_loss=round(tr.final_loss, 4))
        return card

    def _gate(self, card, heldout: list[Pair], distractors, report, cfg: DistillConfig | None = None) -> None:
        from ..learn.gate import validate

        t0 = time.perf_counter()
        cfg = cfg or self.config
        v = validate(card, self.engine, [(p.query, p.answer) for p in heldout], self.guard,
                     margin=cfg.margin, max_drift=cfg.max_drift,
                     distractors=distractors if self.kind == "encoder" else ())
        if self.kind == "encoder" and cfg.gate_rule == "bootstrap":
            v = _bootstrap_gate(card, self.engine, heldout, distractors, v, cfg)
        self._verdict(v, report, t0)

    def _verdict(self, v, report, t0: float, **info: Any) -> None:
        """Record the gate's report and stage; no card when it refused."""
        report["gate"] = v.to_dict()
        self._stage(report, "gate", t0, passed=v.passed, metric=v.metric, before=round(v.before, 4),
                    after=round(v.after, 4), drift=round(v.drift, 4) if v.n_guard else None, **info)
        if not v.passed:
            raise _NoCard("the gate refused the skill: " + "; ".join(v.reasons))

    def _crossfitting(self) -> bool:
        cfg = self.config
        return self.kind == "encoder" and cfg.gate_rule == "bootstrap" and cfg.gate_folds > 1

    def _crossfit(self, ps: PairSet, passages, name: str, report, cfg: DistillConfig | None = None):
        """The cross-fitted gate (``DistillConfig.gate_folds``): K cards, each trained without
        one fold's questions (:func:`_fold_plan`; with ``gate_heldout="unseen"`` without anything
        about the fold's passages) and measured on them, give paired base/card figures for every
        eligible question; the bootstrap over passages decides on the
        pooled figures. Only when they pass is the card kept trained on all pairs and checked
        for drift on the guard texts; its validation report carries the cross-fitted figures
        and its own checksum. This measures the training recipe on this topic rather than one
        card on one held-out quarter: the usual price of using all the data for the final model
        (Hastie, Tibshirani & Friedman 2009, §7.10)."""

        import numpy as np

        from ..learn.gate import DEFAULTS, ValidationReport, validate

        cfg = cfg or self.config
        eligible = _eligible(ps, cfg.gate_heldout)
        by_passage = _questions_by_passage(ps, eligible)
        if len(eligible) < cfg.min_heldout or len(by_passage) < 2:
            raise _NoCard(f"thin data: {len(eligible)} question-like pairs from {len(by_passage)} passage(s); "
                          f"the gate needs at least {cfg.min_heldout} from 2 passages")
        plan = _fold_plan(ps, cfg.gate_folds, cfg.gate_heldout, cfg.seed)
        k = len(plan)
        if k < 2:
            raise _NoCard(f"thin data: {sum(len(h) for h, _ in plan)} question(s) about passages that keep "
                          f"other training pairs, too few for {cfg.gate_folds} cross-fitted folds")
        t0 = time.perf_counter()
        rr_b, rr_a, nll_b, nll_a, top_b, top_a, clusters, held_all = [], [], [], [], [], [], [], []
        report["folds"] = []
        for f, (held_idx, fold) in enumerate(plan):
            tf = time.perf_counter()
            held = [ps.pairs[i] for i in held_idx]
            skip = set(held_idx)
            train = [p for i, p in enumerate(ps.pairs) if i not in skip and not (set(p.passage_ids) & fold)]
            if len(train) < 2:
                raise _NoCard(f"thin data: fold {f + 1} of {k} leaves {len(train)} training pairs")
            self._emit("fold_start", {"fold": f + 1, "folds": k, "pairs": len(train), "heldout": len(held),
                                      "epochs": self._epochs(train)})
            card, _ = self._fit(train, name, report, key="fold_training")
            before, after = _paired_ranks(card, self.engine, held, _distractors(ps, passages, held))
            for dst, src in ((rr_b, before.rr), (rr_a, after.rr), (nll_b, before.nll), (nll_a, after.nll),
                             (top_b, before.top1), (top_a, after.top1)):
                dst.append(src)
            clusters += [p.passage_ids[0] for p in held]
            held_all += held
            info = {"fold": f + 1, "folds": k, "train": len(train), "heldout": len(held),
                    "passages": len({p.passage_ids[0] for p in held}), "mrr_before": round(float(before.rr.mean()), 4),
                    "mrr_after": round(float(after.rr.mean()), 4), "seconds": round(time.perf_counter() - tf, 3)}
            report["folds"].append(info)
            self._emit("fold", info)
        report["timings"]["folds"] = round(time.perf_counter() - t0, 3)
        report["split"] = {"folds": k, "train": len(ps.pairs), "heldout": len(held_all),
                           "heldout_by_origin": _count(p.origin for p in held_all),
                           "gate_heldout": cfg.gate_heldout}
        tg = time.perf_counter()
        cat = np.concatenate
        pooled_b = _Ranks(cat(rr_b), cat(top_b), cat(nll_b))
        pooled_a = _Ranks(cat(rr_a), cat(top_a), cat(nll_a))
        reasons, details = _retrieval_verdict(pooled_b, pooled_a, clusters, cfg, folds=k)
        if reasons:
            # The recipe failed on this topic, so the card trained on all pairs would be refused
            # whatever its drift: the verdict comes without training it (a fold's worth of time,
            # ~100 s on two cores). No card was measured: no checksum, no guard texts.
            max_drift = DEFAULTS["encoder"]["max_drift"] if cfg.max_drift is None else float(cfg.max_drift)
            unmeasured = ValidationReport(kind="encoder", metric="mrr@10", before=0.0, after=0.0, margin=0.0,
                                          drift=0.0, max_drift=max_drift, passed=False,
                                          details={"cross_fit_folds": k}, n_heldout=len(held_all))
            self._verdict(_with_verdict(unmeasured, pooled_b, pooled_a, reasons, details, cfg), report, tg, folds=k)
        card = self._train(ps.pairs, name, report)
        tg = time.perf_counter()
        # validate() for the final card's drift and checksum only: its retrieval figures would be
        # measured on the card's own training pairs and are replaced by the cross-fitted ones, so
        # it gets the two pairs it needs, not all of them
        v = validate(card, self.engine, [(p.query, p.answer) for p in held_all[:2]], self.guard,
                     margin=cfg.margin, max_drift=cfg.max_drift, store=False)
        v = dc_replace(v, details={"cross_fit_folds": k}, n_heldout=len(held_all))
        v = _with_verdict(v, pooled_b, pooled_a, reasons, details, cfg)
        card.metadata["validation"] = v.to_json()
        self._verdict(v, report, tg, folds=k)
        return card

    def _describe(self, card, queries, passages, sources, ps: PairSet, provider, report):
        card.metadata.update({
            "description": f"Skill distilled from {len(sources)} document(s) for: " + "; ".join(queries[:3])[:300],
            "source": "aios_fast.evolve.CloudDistiller",
            "sources": json.dumps(sources, sort_keys=True),
            "teacher": _teacher_name(provider) or "none",
            "pairs": json.dumps(ps.by_origin(), sort_keys=True),
            "passage_ids": json.dumps(sorted({p.id for p in passages})),
        })
        return card

    def _save(self, card, queries, ps: PairSet, examples, report, stage):
        t0 = time.perf_counter()
        exs = list(examples) if examples is not None else _router_examples(queries, ps, self.config)
        meta = {"sources": card.metadata["sources"], "teacher": card.metadata["teacher"],
                "pairs": card.metadata["pairs"]}
        add_kw = {"examples": exs, "description": card.metadata["description"], "metadata": meta}
        report["examples"] = len(exs)
        if self.library is None:
            self._stage(report, "save", t0, stored=False)
            return None
        target = stage(card, add_kw) if stage is not None else card
        entry = self.library.add(target, exs, add_kw["description"], origin="trained",
                                 validation=report["gate"], metadata=meta)
        report["entry"] = {"key": entry.key, "content_hash": entry.content_hash, "path": str(entry.path)}
        self._stage(report, "save", t0, stored=True, key=entry.key)
        for hook in list(self.publish_hooks):
            try:
                hook(entry)
            except Exception as exc:  # a publisher's failure must not undo learning
                report.setdefault("publish_errors", []).append(f"{getattr(hook, '__name__', hook)}: {exc}")
        return entry


@dataclass(frozen=True)
class _Ranks:
    rr: Any        # (n,) float64 reciprocal rank at k (0 beyond k)
    top1: Any      # (n,) bool
    nll: Any       # (n,) float64 -log softmax probability of the right answer (training scale)


#: cosine -> logit scale of the held-out loss: the contrastive objective's (TrainConfig.scale)
GATE_SCALE = 20.0


def _paired_ranks(card, engine: Any, heldout: Sequence[Pair], distractors: Sequence[str], k: int = 10):
    """Per-question reciprocal ranks of the right answer among the held-out answers plus
    ``distractors``, for the base model and with ``card`` applied (the same candidates and the
    same measurement as :func:`aios_fast.learn.gate.retrieval_metrics`, kept per question so
    the decision can be paired)."""

    import numpy as np
    import torch

    from ..learn._engine import as_engine
    from ..learn.gate import candidate_sims
    from ..lora import LoRAManager
    from ..lora.layer import base_only

    view = as_engine(engine)
    qs = [p.query for p in heldout]
    answers = [p.answer for p in heldout]

    def ranks() -> _Ranks:
        sims, own = candidate_sims(view, qs, answers, distractors)
        rank = (sims > own.unsqueeze(1)).sum(1).numpy()
        nll = (torch.logsumexp(sims * GATE_SCALE, dim=1) - own * GATE_SCALE).numpy()
        return _Ranks(np.where(rank < k, 1.0 / (rank + 1.0), 0.0), rank == 0, nll)

    import uuid

    # a private name, as in validate: the caller may hold a card of the same name on this model
    probe = dc_replace(card, name=f"{card.name}#gate-{uuid.uuid4().hex[:12]}", metadata={})
    with base_only():
        before = ranks()
        with LoRAManager(view.model).applied(probe):
            after = ranks()
    return before, after


def bootstrap_lower_bound(diffs: Any, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
                          clusters: Sequence[Any] | None = None) -> float:
    """One-sided lower confidence bound of the mean of paired differences by the percentile
    bootstrap (Efron & Tibshirani 1993, ch. 13): resample with replacement and take the
    ``1 - confidence`` quantile of the resampled means. A bound above 0 means the gain is
    unlikely to be noise of this held-out set; an all-zero ``diffs`` gives exactly 0.

    ``clusters`` (one label per difference, e.g. the question's passage) resamples whole
    clusters instead of single differences (the cluster bootstrap, Davison & Hinkley 1997, §3.8):
    questions about one passage share its answer and are not independent, and resampling them
    one by one would understate the noise."""
    import numpy as np

    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise InputError(f"bootstrap_lower_bound: need a 1-D array of >= 2 differences, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    if clusters is None:
        idx = rng.integers(0, d.size, size=(resamples, d.size))
        return float(np.quantile(d[idx].mean(1), 1.0 - confidence))
    labels = list(clusters)
    if len(labels) != d.size:
        raise InputError(f"bootstrap_lower_bound: {len(labels)} cluster labels for {d.size} differences")
    _, inv = np.unique(np.asarray([str(c) for c in labels]), return_inverse=True)
    sums, counts = np.bincount(inv, weights=d), np.bincount(inv).astype(np.float64)
    if sums.size < 2:
        raise InputError("bootstrap_lower_bound: need at least 2 clusters")
    pick = rng.integers(0, sums.size, size=(resamples, sums.size))
    return float(np.quantile(sums[pick].sum(1) / counts[pick].sum(1), 1.0 - confidence))


def _bootstrap_gate(card, engine, heldout, distractors, v, cfg: "DistillConfig"):
    """The noise-aware decision on the held-out questions, paired base vs card on the same
    candidates, resampled by passage (:func:`bootstrap_lower_bound` with clusters):

    - ``gate_statistic="loss"`` (default): the held-out contrastive loss (``-log`` softmax
      probability of the right answer at the training scale) must fall, with a bootstrap lower
      bound of the mean reduction above 0, AND the mean MRR@10 must not fall. The loss moves
      with every question, so it resolves a gain that MRR@10's rank jumps hide. (On the
      mostly inverse-cloze held-out of 2026-12-02 it resolved no more than MRR@10; on held-out
      teacher questions, cross-fitted, it separates helpful and harmful cards far more widely:
      BENCHMARKS.md, "Distillation".)
    - ``gate_statistic="mrr"``: the mean MRR@10 gain's lower bound must be above 0.

    Both also need ``cfg.margin`` (a floor on the mean MRR@10 gain) when set, and the guard drift
    within ``validate``'s bound. Returns ``v`` with the primary metric (MRR@10), the verdict and
    the reasons replaced (drift, checksum and recall@1 figures kept)."""
    before, after = _paired_ranks(card, engine, heldout, distractors)
    out = _decide(before, after, [p.passage_ids[0] for p in heldout], v, cfg)
    card.metadata["validation"] = out.to_json()
    return out


def _retrieval_verdict(before: _Ranks, after: _Ranks, clusters: Sequence[str], cfg: "DistillConfig",
                       folds: int = 1) -> tuple[list[str], dict[str, Any]]:
    """The reasons the paired per-question figures refuse the skill (none: they pass) and the
    figures behind them. ``folds`` > 1: pooled from that many cross-fitted cards, each measured
    on the questions it was not trained on."""
    diffs = after.rr - before.rr
    drop = before.nll - after.nll
    n_pass = len(set(clusters))
    held = "held-out" if folds <= 1 else f"held-out ({folds}-fold cross-fitted)"
    if n_pass >= 2:
        lb = bootstrap_lower_bound(diffs, cfg.gate_confidence, cfg.gate_resamples, cfg.seed, clusters)
        loss_lb = bootstrap_lower_bound(drop, cfg.gate_confidence, cfg.gate_resamples, cfg.seed, clusters)
    else:   # one passage: its questions say nothing about how the gain varies between passages
        lb = loss_lb = float("-inf")
    gain = float(diffs.mean())
    reasons = []
    if cfg.gate_statistic == "mrr" and not lb > 0.0:
        reasons.append(f"mrr@10 went from {before.rr.mean():.4f} to {after.rr.mean():.4f} on "
                       f"{len(diffs)} {held} questions ({n_pass} passages): gain {gain:+.4f}, its "
                       f"{cfg.gate_confidence:.0%} bootstrap lower bound {lb:+.4f} is not above 0")
    if cfg.gate_statistic == "loss":
        if not loss_lb > 0.0:
            reasons.append(f"held-out loss went from {before.nll.mean():.4f} to {after.nll.mean():.4f} on "
                           f"{len(diffs)} {held} questions ({n_pass} passages): its {cfg.gate_confidence:.0%} "
                           f"bootstrap lower bound of the reduction {loss_lb:+.4f} is not above 0 "
                           f"(mrr@10 {before.rr.mean():.4f} -> {after.rr.mean():.4f})")
        elif not gain >= 0.0:
            reasons.append(f"mrr@10 went down from {before.rr.mean():.4f} to {after.rr.mean():.4f} on "
                           f"{len(diffs)} {held} questions although the loss fell")
    if cfg.margin is not None and not gain >= cfg.margin:
        reasons.append(f"mrr@10 gain {gain:+.4f} is below the margin {cfg.margin}")
    finite = n_pass >= 2   # no bound at all from one passage (and -inf is not JSON)
    details = {"mrr@10_gain_lower_bound": lb if finite else None, "gate_confidence": cfg.gate_confidence,
               "gate_heldout": cfg.gate_heldout,
               "gate_statistic": cfg.gate_statistic, "heldout_passages": n_pass,
               "loss_before": float(before.nll.mean()), "loss_after": float(after.nll.mean()),
               "loss_reduction_lower_bound": loss_lb if finite else None,
               "improved": int((diffs > 0).sum()), "worsened": int((diffs < 0).sum()),
               "recall@1_before": float(before.top1.mean()), "recall@1_after": float(after.top1.mean())}
    return reasons, details


def _decide(before: _Ranks, after: _Ranks, clusters: Sequence[str], v, cfg: "DistillConfig", folds: int = 1):
    """The decision of :func:`_bootstrap_gate`: the paired retrieval figures
    (:func:`_retrieval_verdict`) and the drift that ``v`` (the card's :func:`validate` report)
    measured."""
    return _with_verdict(v, before, after, *_retrieval_verdict(before, after, clusters, cfg, folds), cfg)


def _with_verdict(v, before: _Ranks, after: _Ranks, reasons: list[str], details: dict[str, Any],
                  cfg: "DistillConfig"):
    """``v`` carrying the paired figures and the retrieval verdict (:func:`_retrieval_verdict`'s
    ``reasons`` and ``details``), plus any drift reason ``v`` already had."""
    reasons = reasons + [r for r in v.reasons if r.startswith("drift")]
    return dc_replace(v, metric="mrr@10", before=float(before.rr.mean()), after=float(after.rr.mean()),
                      margin=0.0 if cfg.margin is None else float(cfg.margin), passed=not reasons,
                      reasons=reasons, details={**v.details, **details})


def _eligible(ps: PairSet, heldout: str = "unseen") -> list[int]:
    """Indices of the pairs the gate may hold out: teacher questions and ICT sentences (a crop
    is a piece of its own answer, not a question); with ``heldout="questions"`` the teacher
    questions only."""
    kinds = ("teacher",) if heldout == "questions" else ("teacher", "ict")
    return [i for i, p in enumerate(ps.pairs) if p.origin in kinds]


def _questions_by_passage(ps: PairSet, eligible: Sequence[int]) -> dict[str, list[int]]:
    """Question indices grouped by their passage (the gate's bootstrap resamples passages)."""
    by_passage: dict[str, list[int]] = {}
    for i in eligible:
        by_passage.setdefault(ps.pairs[i].passage_ids[0], []).append(i)
    return by_passage


def _pairs_per_passage(ps: PairSet) -> Counter[str]:
    return Counter(p.passage_ids[0] for p in ps.pairs)


def _studied_heldout(ps: PairSet, eligible: Sequence[int], fraction: float, rng: random.Random) -> set[int]:
    """The ``"studied"`` and ``"questions"`` held-out of one split: ``fraction`` of the teacher
    questions and (``"studied"``, when ``eligible`` holds ICT pairs) one ICT sentence of every
    passage with two or more, keeping only questions whose passage is still trained on by
    another pair. The ICT sentence is left out of its passage's answer text
    (:func:`~aios_fast.evolve.pairs.inverse_cloze_pairs`), so it is a new question about a known
    passage, as a user's question about the studied documents is."""
    teacher = [i for i in eligible if ps.pairs[i].origin == "teacher"]
    rng.shuffle(teacher)
    held = set(teacher[:int(round(fraction * len(teacher)))])
    ict = _questions_by_passage(ps, [i for i in eligible if ps.pairs[i].origin == "ict"])
    for pid in sorted(ict):
        if len(ict[pid]) >= 2:
            held.add(rng.choice(ict[pid]))
    total = _pairs_per_passage(ps)
    out_of = Counter(ps.pairs[i].passage_ids[0] for i in held)
    return {i for i in held if out_of[ps.pairs[i].passage_ids[0]] < total[ps.pairs[i].passage_ids[0]]}


def _fold_plan(ps: PairSet, folds: int, heldout: str = "unseen", seed: int = 0) -> list[tuple[list[int], set[str]]]:
    """The cross-fitted gate's folds: per fold, the indices of its held-out questions and the
    passages its card must not train on at all.

    ``"unseen"``: the question-bearing passages are dealt into the folds; a fold holds out all
    questions of its passages and its card trains on nothing about them. ``"studied"``: each
    passage's questions are dealt round the folds from a random start, so a fold holds out at
    most ``ceil(n / folds)`` of a passage's ``n`` and its card still trains on the rest;
    passages with a single pair are never held out. Either way every eligible question is held
    out by exactly one fold; empty folds are dropped."""
    if heldout not in GATE_HELDOUT:
        raise InputError(f"heldout: expected one of {', '.join(map(repr, GATE_HELDOUT))}, got {heldout!r}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise InputError(f"folds: expected an int >= 2, got {folds!r}")
    by_passage = _questions_by_passage(ps, _eligible(ps, heldout))
    order = sorted(by_passage)
    rng = random.Random(seed)
    rng.shuffle(order)
    if heldout == "unseen":
        k = min(folds, len(order))
        return [([i for pid in order[f::k] for i in by_passage[pid]], set(order[f::k])) for f in range(k)]
    total = _pairs_per_passage(ps)
    plan: list[list[int]] = [[] for _ in range(folds)]
    for pid in order:
        if total[pid] < 2:
            continue
        qs = list(by_passage[pid])
        rng.shuffle(qs)
        start = rng.randrange(folds)
        for j, i in enumerate(qs):
            plan[(start + j) % folds].append(i)
    return [(sorted(h), set()) for h in plan if h]


def _distractors(ps: PairSet, passages, heldout: Sequence[Pair]) -> list[str]:
    """Every retrieved passage competes as an answer, in the same form as the held-out answers
    (its shared ICT answer where it has one), except the held-out pairs' own passages."""
    taken = {pid for p in heldout for pid in p.passage_ids}
    shared = {p.passage_ids[0]: p.answer for p in ps.pairs if p.origin == "ict"}
    return [shared.get(p.id, p.text) for p in passages if p.id not in taken]


def _router_examples(queries, ps: PairSet, cfg: DistillConfig) -> list[str]:
    """What the router matches future queries against: the topic's queries first, then the kept
    teacher questions, then ICT sentences (statements, but of the skill's own material)."""
    out, seen = [], set()
    for text in list(queries) + [p.query for p in ps.pairs if p.origin == "teacher"] + \
            [p.query for p in ps.pairs if p.origin == "ict"]:
        k = " ".join(text.lower().split())
        if k and k not in seen and len(text) <= 1000:
            seen.add(k)
            out.append(text)
        if len(out) >= cfg.max_examples:
            break
    return out


def _count(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def _teacher_name(provider: Any) -> str | None:
    if provider is None:
        return None
    try:
        return str(provider.name())
    except Exception:  # a provider's name() is informational only
        return type(provider).__name__


# ============================================================================ journal
class DistillJournal:
    """One JSON file per topic (``<dir>/<topic>.json``, written atomically) recording a job's
    state: ``started`` -> ``staged`` (gated card file written, library-add arguments saved) ->
    ``done`` (in the library) or ``failed``. Staged card files live beside it."""

    _SAFE = re.compile(r"[^A-Za-z0-9_.-]")

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, topic_id: str) -> Path:
        return self.directory / f"{self._SAFE.sub('_', topic_id)[:100]}.json"

    def card_path(self, topic_id: str) -> Path:
        return self.directory / f"{self._SAFE.sub('_', topic_id)[:100]}.lora.arrow"

    def get(self, topic_id: str) -> dict[str, Any] | None:
        p = self.path(topic_id)
        if not p.is_file():
            return None
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("journal %s unreadable (%s); the job starts over", p, exc)
            return None
        return d if isinstance(d, dict) else None

    def set(self, topic_id: str, **state: Any) -> dict[str, Any]:
        d = self.get(topic_id) or {"topic_id": topic_id}
        d.update(state, updated=time.time())
        atomic_write_bytes(self.path(topic_id), json.dumps(d, sort_keys=True, default=str).encode())
        return d


# ============================================================================ Tier 1
class LibrarySource:
    """Tier 1 from this node's own library: a skill whose examples already route the request's
    queries confidently (e.g. learnt earlier under another topic id, or added by hand).

    Args:
        library: the :class:`SkillLibrary`; ``encoder``: to route (default: the library's).
        min_confidence: a candidate's mean routing confidence over the queries must reach this.
    """

    name = "library"

    def __init__(self, library: "SkillLibrary", encoder: Any = None, min_confidence: float = 0.6) -> None:
        self.library = library
        self.encoder = encoder if encoder is not None else getattr(library, "encoder", None)
        self.min_confidence = float(min_confidence)

    def candidates(self, request: LearningRequest) -> list[SourceCandidate]:
        if self.encoder is None or not self.library.list():
            return []
        from ..route.router import LoRARouter

        router = LoRARouter(self.encoder, self.library)
        votes: dict[str, list[float]] = {}
        for r in router.route_many(list(request.queries)):
            if r.skill is not None:
                votes.setdefault(r.skill, []).append(float(r.confidence))
        n = len(request.queries)
        out = []
        for name, confs in votes.items():
            score = sum(confs) / n   # queries routed elsewhere count as 0
            if score >= self.min_confidence:
                out.append(SourceCandidate("library", name, name, score, {"routed": len(confs), "queries": n}))
        return sorted(out, key=lambda c: -c.confidence)

    def acquire(self, candidate: SourceCandidate, library: "SkillLibrary") -> "SkillEntry | None":
        try:
            return self.library.get(candidate.handle)
        except InputError:
            return None


# ============================================================================ the learner
class SkillDistiller:
    """The node's learner (:class:`aios_fast.evolve.jobs.Learner`): Tier 1 sources, then Tier 2
    distillation, then Tier 3 extraction on a Super node.

    Args:
        node: the :class:`SkillNode` (its encoder, library).
        tier: the node's hardware tier (``"leaf"``, ``"hub"``, ``"super"``; default detected by
            :func:`aios_fast.hardware.detect`). Tier 3 runs only on ``"super"``.
        sources: Tier 1 :class:`SkillSource` objects (default ``[LibrarySource(node.library)]``).
        teacher: Tier 2 teacher (default: ``LocalTeacher()``; ``False`` for document-only pairs).
        docs, urls: Tier 2 grounding.
        stronger_model: Tier 3: a fine-tuned/stronger checkpoint of the node's base (path or
            model) to probe and extract from.
        logger: QALogger or directory (default ``<library>/qa``).
        journal_dir: job journal (default ``<library>/jobs``).
        config: :class:`DistillConfig` for Tier 2. ``progress``/``on_event``: see CloudDistiller.
    """

    def __init__(self, node: Any, tier: str | None = None, sources: Sequence[Any] | None = None,
                 teacher: Any = None, docs: Any = None, stronger_model: Any = None, *, urls: Any = None,
                 logger: Any = None, journal_dir: str | Path | None = None,
                 config: DistillConfig | dict | None = None, progress: bool = False,
                 on_event: Callable[[str, dict], None] | None = None) -> None:
        self.node = node
        if tier is None:
            from ..hardware import detect

            tier = detect().tier.value
        tier = str(getattr(tier, "value", tier)).lower()
        if tier not in ("leaf", "hub", "super"):
            raise InputError(f"tier must be 'leaf', 'hub' or 'super', got {tier!r}")
        self.tier = tier
        self.sources = list(sources) if sources is not None else [LibrarySource(node.library, node.encoder)]
        if teacher is None:
            from .teachers import LocalTeacher

            teacher = LocalTeacher()
        self.teacher = teacher or None
        self.docs, self.urls = docs, urls
        self.stronger_model = stronger_model
        lib_dir = Path(node.library.directory)
        if logger is None:
            logger = lib_dir / "qa"
        self.cloud = CloudDistiller(node.encoder, node.library, logger, config=config, progress=progress,
                                    on_event=on_event)
        self.journal = DistillJournal(journal_dir if journal_dir is not None else lib_dir / "jobs")

    def learn(self, request: LearningRequest) -> LearnOutcome:
        """Serve one request; never raises for a skill that could not be made (the outcome's
        report says why), only for programming errors."""
        lib = self.node.library
        done = self.journal.get(request.topic_id)
        if done and done.get("state") == "done":
            e = lib.find_by_hash(done.get("content_hash", ""))
            if e is not None:
                return LearnOutcome(e, done.get("tier"), {"tier": done.get("tier"), "resumed": "already done"})
        if done and done.get("state") == "staged":
            e = self._add_staged(request.topic_id, done)
            if e is not None:
                return LearnOutcome(e, 2, {"tier": 2, "resumed": "staged card added after a restart",
                                           "skill": e.key})
        self.journal.set(request.topic_id, state="started", request=request.to_dict())
        report: dict[str, Any] = {"tiers": {}}
        for tier, fn in ((1, self._tier1), (2, self._tier2), (3, self._tier3)):
            try:
                entry, sub = fn(request)
            except AiosError as exc:
                entry, sub = None, {"reason": f"{type(exc).__name__}: {exc}"}
            report["tiers"][str(tier)] = sub
            if entry is not None:
                report.update(tier=tier, skill=entry.key)
                self.journal.set(request.topic_id, state="done", tier=tier, key=entry.key,
                                 content_hash=entry.content_hash)
                return LearnOutcome(entry, tier, report)
        report["reason"] = "no tier produced a skill: " + "; ".join(
            f"tier {t}: {r.get('reason', '?')}" for t, r in report["tiers"].items())
        self.journal.set(request.topic_id, state="failed", reason=report["reason"])
        return LearnOutcome(None, None, report)

    # ------------------------------------------------------------------ tiers
    def _tier1(self, request):
        tried = []
        for src in self.sources:
            for cand in src.candidates(request):
                tried.append({"source": cand.source, "name": cand.name, "confidence": round(cand.confidence, 3)})
                entry = src.acquire(cand, self.node.library)
                if entry is not None:
                    return entry, {"candidates": tried, "acquired": entry.key}
        return None, {"candidates": tried, "reason": "no source offered a skill that routes the queries"
                      if not tried else "no candidate could be acquired"}

    def _tier2(self, request):
        if self.docs is None and self.urls is None and self.cloud.index is None:
            return None, {"reason": "no documents or URLs configured for grounding"}
        res = self.cloud.distill_topic(list(request.queries), self.teacher, docs=self.docs, urls=self.urls,
                                       skill_name=skill_name_for(request.queries, request.topic_id),
                                       stage=lambda card, kw: self._stage(request.topic_id, card, kw))
        return res.entry, res.report

    def _stage(self, topic_id: str, card, add_kw: dict) -> Path:
        from ..cards import LoRAFormat

        path = LoRAFormat.save(card, self.journal.card_path(topic_id))
        self.journal.set(topic_id, state="staged", card=str(path), add=add_kw,
                         validation=card.metadata.get("validation"))
        return path

    def _add_staged(self, topic_id: str, state: dict):
        path = Path(state.get("card", ""))
        if not path.is_file():
            return None
        kw = state.get("add") or {}
        e = self.node.library.add(path, kw.get("examples", ()), kw.get("description"), origin="trained",
                                  validation=state.get("validation"), metadata=kw.get("metadata"))
        self.journal.set(topic_id, state="done", tier=2, key=e.key, content_hash=e.content_hash)
        return e

    def _tier3(self, request):
        """Probe the node's encoder on the request's queries, extract the stronger model's
        weight delta where the heat map says the topic lives, and keep it only if it passes
        the same gate as a distilled skill (on every passage's inverse-cloze questions: the
        card never saw them, it was not trained here)."""
        if self.tier != "super":
            return None, {"reason": f"tier 3 runs on a Super node; this node is {self.tier}"}
        if self.stronger_model is None:
            return None, {"reason": "no stronger_model configured for extraction"}
        if self.cloud.index is None and self.docs is None and self.urls is None:
            return None, {"reason": "no documents or URLs to gate an extracted skill on"}
        from ..extract.extractor import LoRAExtractor
        from ..probe.probe import WeightMapProbe
        from .pairs import inverse_cloze_pairs

        t0 = time.perf_counter()
        cfg, enc = self.cloud.config, self.node.encoder
        sub: dict[str, Any] = {"timings": {}, "stages": []}
        try:
            passages, _ = self.cloud._ground(list(request.queries), self.docs, self.urls, sub)
            held = inverse_cloze_pairs(passages, cfg.ict_per_passage, seed=cfg.seed)
            if len(held) < cfg.min_heldout:
                raise _NoCard(f"thin data: {len(held)} inverse-cloze questions to gate on, need {cfg.min_heldout}")
            heat = WeightMapProbe(enc, modules=cfg.target_modules).probe(
                list(request.queries), baseline_inputs=guard_texts())
            card = LoRAExtractor(rank=cfg.rank).extract_from_heat_map(
                self.stronger_model, enc.model, heat, rank_budget=cfg.rank * 16,
                name=skill_name_for(request.queries, request.topic_id))
            sub["modules"] = len(card.modules)
            self.cloud._gate(card, held, [], sub)
        except _NoCard as why:
            sub["reason"] = str(why)
            return None, sub
        except InputError as exc:   # e.g. a stronger model that does not differ from the base
            sub["reason"] = f"extraction from the stronger model failed: {exc}"
            return None, sub
        finally:
            sub["seconds"] = round(time.perf_counter() - t0, 3)
        card.metadata["source"] = "aios_fast.evolve.SkillDistiller tier 3 (probe + extraction)"
        entry = self.node.library.add(card, list(request.queries), origin="extracted", validation=sub["gate"])
        return entry, sub


def enable_evolution(node: Any, cloud_providers: Any = None, confidence_threshold: float | None = None,
                     rank: int = 8, **kw: Any) -> SkillDistiller:
    """Wire a :class:`SkillDistiller` in as ``node``'s learner (ArrowEngine's
    ``SkillNode.enable_evolution``) and return it.

    Args:
        cloud_providers: a teacher or a list of teachers (the first is used); default
            ``LocalTeacher()``.
        confidence_threshold: routing confidence below which the node is unsure (sets the
            router's and the trigger's threshold).
        rank: LoRA rank of distilled skills.
        kw: further :class:`SkillDistiller` arguments (``docs``, ``urls``, ``tier``,
            ``sources``, ``stronger_model``, ``config``...).
    """
    teacher = cloud_providers
    if isinstance(cloud_providers, (list, tuple)):
        teacher = cloud_providers[0] if cloud_providers else None
    cfg = kw.pop("config", None)
    cfg = cfg if isinstance(cfg, DistillConfig) else DistillConfig(**{**(cfg or {}), "rank": rank})
    if confidence_threshold is not None:
        t = float(confidence_threshold)
        if not 0.0 < t < 1.0:
            raise InputError(f"confidence_threshold must be in (0, 1), got {confidence_threshold!r}")
        node.router.threshold = t
        node.trigger.threshold = t
    distiller = SkillDistiller(node, teacher=teacher, config=cfg, **kw)
    node.set_learner(distiller)
    return distiller
