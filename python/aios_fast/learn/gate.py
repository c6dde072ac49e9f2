"""The validation gate: a skill card is kept only if it measurably helps and does little harm.
(This module is ``gate`` so that ``aios_fast.learn.validate`` stays the function.)

- Encoders: recall@1 and MRR@10 of held-out questions retrieving their answers (cosine, among
  the held-out answers); drift = 1 − mean cosine between base and adapted embeddings of general
  guard texts.
- Causal LMs: mean per-token NLL of the held-out answers given their chat prompts (lower is
  better); drift = increase of mean per-token NLL on the guard texts.

A card passes iff the primary metric improves by at least ``margin`` (recall@1 up, or answer
NLL down) and the drift is at most ``max_drift``. The report is stored in the card's metadata
under ``"validation"`` as a JSON string and bound to the card's tensors by
``LoRACard.tensor_checksum()``; :func:`save_validated` refuses cards that failed and reports
that belong to other tensors.

The measurement does not disturb the caller: the base figures are taken inside
:func:`aios_fast.lora.base_only` (the caller's global, merged and scoped cards set aside, in
this thread only) and the candidate is entered as a scoped card under a private name, so it
works inside ``mgr.applied(...)``, with merged cards, and while other threads serve requests.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import InputError, SkillRejectedError
from ._engine import EngineView, as_engine, as_pairs

__all__ = ["ValidationReport", "validate", "save_validated", "retrieval_metrics", "answer_nll"]

DEFAULTS = {"encoder": {"margin": 0.05, "max_drift": 0.15},
            "causal": {"margin": 0.05, "max_drift": 0.25}}


@dataclass
class ValidationReport:
    """Before/after metrics, drift and the verdict (with the reasons when it fails)."""

    kind: str
    metric: str
    before: float
    after: float
    margin: float
    drift: float
    max_drift: float
    passed: bool
    reasons: list[str] = field(default_factory=list)
    details: dict[str, float] = field(default_factory=dict)
    n_heldout: int = 0
    n_guard: int = 0
    #: ``LoRACard.tensor_checksum()`` of the card measured (None in reports from before it existed)
    card_checksum: str | None = None

    @property
    def improvement(self) -> float:
        """Signed gain in the metric's good direction (NLL: before − after)."""
        return self.before - self.after if self.metric == "answer_nll" else self.after - self.before

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["improvement"] = self.improvement
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ValidationReport":
        """Parse :meth:`to_json` output; raise :class:`InputError` naming what is wrong."""
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise InputError(f"validation report is not JSON: {exc}") from None
        if not isinstance(d, dict):
            raise InputError(f"validation report must be a JSON object, got {type(d).__name__}")
        d.pop("improvement", None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"validation report has unknown fields {unknown}; expected {sorted(known)}")
        try:
            return cls(**d)
        except TypeError as exc:
            raise InputError(f"validation report is incomplete: {exc}") from None


def answer_candidates(answers: Sequence[str], distractors: Sequence[str] = ()) -> tuple[list[str], torch.Tensor]:
    """The candidate texts a retrieval measure ranks (each distinct answer once, then the
    distractors that are not answers) and, per question, the column of its own answer.

    Questions that share an answer (a passage's several questions) must share one column: with
    the text repeated, its copies tie with the right answer up to float noise, and whether the
    noise puts a copy above it decided ranks at random."""
    col: dict[str, int] = {}
    for a in answers:
        col.setdefault(a, len(col))
    cands = list(col)
    for t in distractors:
        if t not in col:
            col[t] = len(cands)
            cands.append(t)
    return cands, torch.tensor([col[a] for a in answers], dtype=torch.long)


def candidate_sims(view: EngineView, questions: Sequence[str], answers: Sequence[str],
                   distractors: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines (float64) of each question with every candidate of :func:`answer_candidates`,
    and each question's cosine with its own answer."""
    cands, col = answer_candidates(answers, distractors)
    sims = (view.encode(list(questions)) @ view.encode(cands).T).double()
    return sims, sims.gather(1, col.unsqueeze(1)).squeeze(1)


def retrieval_metrics(view: EngineView, pairs: Sequence[tuple[str, str]], k: int = 10,
                      distractors: Sequence[str] = ()) -> dict[str, float]:
    """recall@1 and MRR@k of each question against all answers of ``pairs`` plus
    ``distractors`` (extra candidate answers, e.g. the training answers)."""
    sims, own = candidate_sims(view, [p[0] for p in pairs], [p[1] for p in pairs], distractors)
    rank = (sims > own.unsqueeze(1)).sum(1)  # 0 = the right answer is the top hit
    rr = torch.where(rank < k, 1.0 / (rank + 1).double(), torch.zeros((), dtype=torch.double))
    return {"recall@1": float((rank == 0).double().mean()), f"mrr@{k}": float(rr.mean())}


@torch.no_grad()
def answer_nll(view: EngineView, pairs: Sequence[tuple[str, str]], batch_size: int = 8) -> float:
    """Mean per-token NLL of the answers given their chat-templated questions."""
    was = view.model.training
    view.model.eval()
    try:
        tot, n = 0.0, 0
        for i in range(0, len(pairs), batch_size):
            s, c = view.token_nll(view.sft_batch(pairs[i:i + batch_size]))
            tot, n = tot + float(s), n + int(c)
        return tot / max(n, 1)
    finally:
        view.model.train(was)


@torch.no_grad()
def _text_nll(view: EngineView, texts: Sequence[str], batch_size: int = 8) -> float:
    tok = view.tokenizer
    was = view.model.training
    view.model.eval()
    try:
        tot, n = 0.0, 0
        for i in range(0, len(texts), batch_size):
            rows = [tok(t, add_special_tokens=True)["input_ids"][:view.max_length] for t in texts[i:i + batch_size]]
            m = max(len(r) for r in rows)
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            ids = torch.full((len(rows), m), pad, dtype=torch.long)
            labels = torch.full((len(rows), m), -100, dtype=torch.long)
            mask = torch.zeros((len(rows), m), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r)
                labels[j, :len(r)] = torch.tensor(r)
                mask[j, :len(r)] = 1
            dev = view.device
            s, c = view.token_nll({"input_ids": ids.to(dev), "attention_mask": mask.to(dev), "labels": labels.to(dev)})
            tot, n = tot + float(s), n + int(c)
        return tot / max(n, 1)
    finally:
        view.model.train(was)


def _measure(view: EngineView, heldout, guard, distractors) -> tuple[dict[str, float], Any]:
    if view.kind == "encoder":
        return retrieval_metrics(view, heldout, distractors=distractors), view.encode(list(guard))
    return {"answer_nll": answer_nll(view, heldout)}, _text_nll(view, list(guard))


def validate(card, engine: Any, heldout_pairs: Any, guard_texts: Sequence[str], margin: float | None = None,
             max_drift: float | None = None, *, check_fingerprint: bool = True,
             distractors: Sequence[str] = (), store: bool = True) -> ValidationReport:
    """Measure ``card`` on ``engine`` (a SentenceEncoder, CausalLM or (model, tokenizer)).

    Args:
        heldout_pairs: (question, answer) pairs NOT used in training.
        guard_texts: general texts the skill should leave alone.
        margin: minimum gain of the primary metric (recall@1 up for encoders, answer NLL down
            for causal LMs); defaults 0.05 / 0.05 nats.
        max_drift: drift bound (encoders: 1 − mean guard cosine, default 0.15; causal: guard NLL
            increase in nats, default 0.25).
        distractors: extra candidate answers for encoder retrieval (e.g. the training
            answers), which makes recall@1 harder and closer to a node's real answer pool.
        store: write the report into ``card.metadata["validation"]`` (JSON).
    The card is applied as a scoped card for the measurement only, under a private name; the
    base is measured with every other card set aside (:func:`aios_fast.lora.base_only`), in
    this thread only. The model is left as it was, and other threads keep their cards.
    """
    from ..cards import LoRACard
    from ..lora import LoRAManager
    from ..lora.layer import base_only

    view = as_engine(engine)
    heldout = as_pairs(heldout_pairs, "heldout_pairs")
    guard = [t for t in guard_texts]
    distractors = list(distractors)
    if len(heldout) < 2:
        raise InputError(f"heldout_pairs: need at least 2 pairs, got {len(heldout)}")
    if not guard or not all(isinstance(t, str) and t.strip() for t in guard):
        raise InputError("guard_texts: need at least one non-empty string")
    d = DEFAULTS[view.kind]
    margin = d["margin"] if margin is None else float(margin)
    max_drift = d["max_drift"] if max_drift is None else float(max_drift)
    if not isinstance(card, LoRACard):
        raise InputError(f"validate needs a LoRACard, got {type(card).__name__}")
    # A private name: the caller may hold a card of the same name (global or scoped) on this
    # model; the tensors are shared, not copied.
    probe = replace(card, name=f"{card.name}#validate-{uuid.uuid4().hex[:12]}",
                    metadata={})
    mgr = LoRAManager(view.model)
    with base_only():
        before, guard_before = _measure(view, heldout, guard, distractors)
        with mgr.applied(probe, check_fingerprint=check_fingerprint):
            after, guard_after = _measure(view, heldout, guard, distractors)
    details = {f"{k}_before": v for k, v in before.items()}
    details.update({f"{k}_after": v for k, v in after.items()})
    if view.kind == "encoder":
        metric = "recall@1"
        drift = float(1.0 - (guard_before * guard_after).sum(1).mean())
        gain = after[metric] - before[metric]
    else:
        metric = "answer_nll"
        drift = float(guard_after - guard_before)
        details.update(guard_nll_before=guard_before, guard_nll_after=guard_after)
        gain = before[metric] - after[metric]
    reasons = []
    if not math.isfinite(after[metric]) or not gain >= margin:
        reasons.append(f"{metric} went from {before[metric]:.4f} "
                       f"to {after[metric]:.4f}: gain {gain:+.4f} is below the margin {margin}")
    if not drift <= max_drift:
        reasons.append(f"drift on the guard set is {drift:.4f}, above the bound {max_drift}")
    report = ValidationReport(kind=view.kind, metric=metric, before=before[metric], after=after[metric],
                              margin=margin, drift=drift, max_drift=max_drift, passed=not reasons,
                              reasons=reasons, details=details, n_heldout=len(heldout), n_guard=len(guard),
                              card_checksum=card.tensor_checksum())
    if store:
        card.metadata["validation"] = report.to_json()
    return report


def save_validated(card, path: str | Path, report: ValidationReport | None = None) -> Path:
    """Save ``card`` with ``LoRAFormat.save`` only if it passed the gate; else raise
    :class:`SkillRejectedError` with the reasons. ``report`` defaults to the one stored in the
    card's metadata by :func:`validate`. The report must be bound to this card's tensors
    (``report.card_checksum == card.tensor_checksum()``): a report made for other tensors, or
    one with no checksum, is refused."""
    from ..cards import LoRAFormat

    if report is None:
        text = card.metadata.get("validation")
        if not text:
            raise SkillRejectedError(f"card {card.name!r} has no validation report; run validate() first")
        try:
            report = ValidationReport.from_json(text)
        except InputError as exc:
            raise SkillRejectedError(f"card {card.name!r}: metadata['validation'] is unusable: {exc}") from None
    if report.card_checksum is None:
        raise SkillRejectedError(f"card {card.name!r}: the validation report is not bound to any tensors "
                                 f"(no card_checksum); run validate() on this card")
    actual = card.tensor_checksum()
    if report.card_checksum != actual:
        raise SkillRejectedError(f"card {card.name!r}: the validation report was made for tensors "
                                 f"{report.card_checksum}, but this card's tensors are {actual}; "
                                 f"run validate() on this card")
    if not report.passed:
        raise SkillRejectedError(f"card {card.name!r} failed the validation gate and was not saved to "
                                 f"{path}: " + "; ".join(report.reasons))
    card.metadata["validation"] = report.to_json()
    return LoRAFormat.save(card, path)
