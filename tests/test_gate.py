"""The validation gate leaves the caller's cards alone and binds its report to the tensors it
measured (issue 13.3): validating inside ``mgr.applied(...)``, with a merged card on the
caller's manager, or with a same-named card in use gives the same "before" as on the bare
model; ``save_validated`` refuses a report made for other tensors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from aios_fast.cards import LoRAFormat
from aios_fast.errors import SkillRejectedError
from aios_fast.learn import save_validated, validate
from aios_fast.learn.gate import ValidationReport, retrieval_metrics
from aios_fast.learn._engine import as_engine
from aios_fast.lora import LoRALayer, LoRAManager
from aios_fast.lora.random import linear_shapes, random_card

DATA = Path(__file__).parent / "data" / "qa"
HELDOUT = [json.loads(l) for l in (DATA / "ferrowind_heldout.jsonl").read_text().splitlines() if l.strip()]
PAIRS = [(r.get("query") or r["question"], r["answer"]) for r in HELDOUT][:10]
GUARD = [l for l in (DATA / "guard.txt").read_text().splitlines() if l.strip()][:8]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cards(encoder):
    shapes = linear_shapes(encoder.model, r"attention\.self\.(query|value)$")
    candidate = random_card(shapes, name="skill", rank=4, seed=11, std=0.02)
    # a strong card of the caller's: it would visibly move the "before" figures
    other = random_card(shapes, name="skill", rank=8, seed=12, std=0.2)
    return candidate, other


@pytest.fixture(scope="module")
def plain(encoder, cards):
    """The report on the bare model (no caller cards)."""
    model = encoder.model
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    return validate(cards[0], encoder, PAIRS, GUARD, store=False)


def _same_figures(a: ValidationReport, b: ValidationReport) -> None:
    for k in ("mrr@10_before", "recall@1_before", "mrr@10_after", "recall@1_after"):
        assert a.details[k] == pytest.approx(b.details[k], abs=1e-6), k
    assert a.drift == pytest.approx(b.drift, abs=1e-5)


def test_caller_card_would_contaminate_a_naive_before(encoder, cards, plain):
    """Sanity: the caller's card really moves the metric, so the tests below can fail."""
    mgr = LoRAManager(encoder.model)
    with mgr.applied(cards[1]):
        m = retrieval_metrics(as_engine(encoder), PAIRS)
    assert abs(m["mrr@10"] - plain.details["mrr@10_before"]) > 0.02


def test_validate_inside_applied_with_a_same_named_card(encoder, cards, plain):
    mgr = LoRAManager(encoder.model)
    with mgr.applied(cards[1]):  # same name "skill", other tensors
        rep = validate(cards[0], encoder, PAIRS, GUARD, store=False)
        # the caller's scope is intact afterwards
        assert any("skill" in m.adapters for m in encoder.model.modules() if isinstance(m, LoRALayer))
    _same_figures(rep, plain)
    assert not any(isinstance(m, LoRALayer) for m in encoder.model.modules())


def test_validate_with_a_merged_and_a_global_card(encoder, cards, plain):
    model = encoder.model
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = LoRAManager(model)
    mgr.apply_card(dataclasses.replace(cards[1], name="merged"))
    mgr.merge("merged")
    mgr.apply_card(dataclasses.replace(cards[1], name="global"), 0.5)
    try:
        # the candidate's fingerprint is the bare model's: a merged card must not trip it
        cand = dataclasses.replace(cards[0], base_fingerprint=LoRAManager(model).fingerprint())
        rep = validate(cand, encoder, PAIRS, GUARD, store=False)
    finally:
        mgr.remove_card("global")
        mgr.remove_card("merged")
    _same_figures(rep, plain)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in snap.items())


def test_report_is_bound_to_the_tensors(encoder, cards, tmp_path):
    cand = dataclasses.replace(cards[0], name="bound")
    rep = validate(cand, encoder, PAIRS, GUARD, margin=-1.0, max_drift=1.0)  # lax: it passes
    assert rep.passed and rep.card_checksum == cand.tensor_checksum()
    path = save_validated(cand, tmp_path / "bound.lora.arrow")
    back = LoRAFormat.load(path)
    assert back.tensor_checksum() == cand.tensor_checksum()
    save_validated(back, tmp_path / "again.lora.arrow")  # a loaded card keeps its binding

    # the passing report carried over to other tensors, via metadata or given explicitly
    other = dataclasses.replace(cards[1], name="bound", metadata={"validation": rep.to_json()})
    with pytest.raises(SkillRejectedError, match="made for tensors sha256:"):
        save_validated(other, tmp_path / "other.lora.arrow")
    with pytest.raises(SkillRejectedError, match="made for tensors"):
        save_validated(other, tmp_path / "other.lora.arrow", rep)
    # an unbound report (no checksum) is refused too
    unbound = dataclasses.replace(rep, card_checksum=None)
    with pytest.raises(SkillRejectedError, match="not bound"):
        save_validated(cand, tmp_path / "unbound.lora.arrow", unbound)
    # a garbled report in metadata is a rejection naming the field, not a JSON traceback
    garbled = dataclasses.replace(cand, metadata={"validation": "{not json"})
    with pytest.raises(SkillRejectedError, match=r"metadata\['validation'\].*not JSON"):
        save_validated(garbled, tmp_path / "garbled.lora.arrow")
    assert not any((tmp_path / n).exists() for n in ("other.lora.arrow", "unbound.lora.arrow",
                                                       "garbled.lora.arrow"))


def test_questions_sharing_an_answer_share_its_column():
    """A passage with several questions is one candidate: repeated, its copies tie with the
    right column up to float noise and the noise decided the rank (a lr=1e-9 card moved the
    cross-fitted MRR@10 by 0.028 once the trainer's buckets changed that noise)."""
    from aios_fast.learn.gate import answer_candidates

    cands, own = answer_candidates(["p1", "p2", "p1", "p3", "p2"], ["p2", "d1", "p1", "d2", "d1"])
    assert cands == ["p1", "p2", "p3", "d1", "d2"]
    assert own.tolist() == [0, 1, 0, 2, 1]


def test_retrieval_metrics_rank_each_distinct_answer_once(encoder):
    # every question is its own answer's text, three questions per answer: a perfect retriever,
    # so each must be ranked first however the float noise of the encodes falls
    texts = ["The ferry leaves from pier four at noon.", "Invoices are emailed on the first of the month.",
             "Water the basil twice a week in summer."]
    pairs = [(t, t) for t in texts for _ in range(3)]
    m = retrieval_metrics(as_engine(encoder), pairs, distractors=["An unrelated sentence about trains."])
    assert m["recall@1"] == 1.0 and m["mrr@10"] == 1.0
