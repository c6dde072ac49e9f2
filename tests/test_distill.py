"""Tier 2 distillation (evolve/pairs.py, evolve/distiller.py) on the TEST-ONLY domain
(tests/data/distill: the fictional Marrowby Libraries). The distiller's defaults were tuned on the
bundled Kestrel demo domain; here they must carry over to a domain they never saw.

Real parts only: the bundled MiniLM and SmolLM2 (LocalTeacher), the real trainer and gate, a real
library and QA log on disk, real HTTP servers on 127.0.0.1 for teacher faults, a real subprocess
killed with os._exit for the journal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "distill"
DOCS = DATA / "docs"
# one torch thread for the whole module (its fixtures train models): see the root conftest
pytestmark = pytest.mark.usefixtures("one_thread")
# the domain's first five documents (10 passages): enough for tests of the journal and the gate's
# mechanics, which do not measure quality and need not train on all 47 passages
CORE_DOCS = ("events_local_history.md", "loans.md", "membership.md", "rooms_printing.md", "shelfwise_app.md")


@pytest.fixture
def two_threads(one_thread):
    """Two intra-op threads for the one test that trains five cards on the whole domain: alone on
    a 2-core machine it runs in 508 s instead of 775 s, with the same figures to the last digit."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(2 if (os.cpu_count() or 1) >= 2 else 1)
    yield
    torch.set_num_threads(n)


def _queries():
    return [l for l in (DATA / "queries.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]


@pytest.fixture(scope="module")
def index(encoder):
    from aios_fast.evolve.retrieval import DocumentIndex

    idx = DocumentIndex(encoder)
    idx.add_folder(DOCS)
    return idx


@pytest.fixture(scope="module")
def core_docs(tmp_path_factory):
    import shutil

    d = tmp_path_factory.mktemp("core-docs")
    for name in CORE_DOCS:
        shutil.copy(DOCS / name, d / name)
    return d


@pytest.fixture(scope="module")
def core_index(encoder, core_docs):
    from aios_fast.evolve.retrieval import DocumentIndex

    idx = DocumentIndex(encoder)
    idx.add_folder(core_docs)
    return idx


# ------------------------------------------------------------------ the test domain itself (fast)
def test_eval_answers_are_verbatim_spans_and_cover_every_document(index):
    """The domain has the demo's shape (>= 12 documents, >= 40 passages, 48 questions) so the
    gate's passage-level held-out is not tiny; every eval answer is a verbatim span of its own
    document (line breaks aside), whole inside one of that document's passages and in no other
    document's; every document is asked about; no question copies 4 words in a row from its document."""
    import re

    from aios_fast.evolve.demo import load_eval

    def flat(text):
        return " ".join(text.split()).lower()

    def words(text):
        return re.findall(r"[a-z0-9']+", text.lower())

    docs = {p.name: p.read_text(encoding="utf-8") for p in DOCS.glob("*.md")}
    items = load_eval(DATA / "eval.jsonl")
    assert len(docs) >= 12 and len(index.passages) >= 40, (len(docs), len(index.passages))
    assert len(items) == 48
    assert len({it.id for it in items}) == 48 and len({flat(it.question) for it in items}) == 48
    assert {it.doc for it in items} == set(docs)
    for it in items:
        assert it.doc in docs, (it.id, it.doc)
        span = flat(it.answer)
        assert span in flat(docs[it.doc]), (it.id, it.answer)
        homes = {Path(p.source).name for p in index.passages if span in flat(p.text)}
        assert homes == {it.doc}, (it.id, homes)
        q, d = words(it.question), " ".join(words(docs[it.doc]))
        copied = [" ".join(q[i:i + 4]) for i in range(len(q) - 3) if " ".join(q[i:i + 4]) in d]
        assert not copied, (it.id, copied)


# ------------------------------------------------------------------ pairs (fast)
def test_judge_question_reasons():
    from aios_fast.evolve.pairs import judge_question

    passage = ("Items can be renewed up to three times online, in the Shelfwise app or at a kiosk, unless "
               "another member has reserved them. Quick Pick items cannot be renewed at all.")
    assert judge_question("How many times can I renew a Shelfwise loan?", passage) is None
    assert judge_question("", passage) == "empty"
    assert judge_question("Renew?", passage) == "too_short"
    assert judge_question("Tell me about renewing items at the kiosk please", passage) == "not_a_question"
    assert judge_question("What does the passage say about renewing items?", passage) == "meta"
    assert judge_question("Quick Pick items cannot be renewed at all?", passage) == "copied"
    assert judge_question("What is the capital city of Peru today?", passage) == "no_overlap"
    assert judge_question("How " + "very " * 40 + "long?", passage) == "too_long"
    assert judge_question("I'm sorry, I can't renew. I can't renew. I can't renew. I can't", passage) == "repetitive"
    assert judge_question("can I renew a reserved item three times in the app?", passage) is None


def test_clean_question_handles_untidy_replies():
    from aios_fast.evolve.pairs import clean_question

    assert clean_question('Question 1: "Can I renew a Quick Pick book?"\nAnswer: no') == "Can I renew a Quick Pick book?"
    assert clean_question("**Q:** how late is Central open? It opens at 9.") == "How late is Central open?"
    assert clean_question("According to the text, how much is colour printing?") == "How much is colour printing?"
    assert clean_question('```json\n[{"question": "Is wifi free?", "answer": "yes"}]\n```') == "Is wifi free?"
    assert clean_question("   \n ") == ""


def test_teacher_free_pairs_keep_passages(encoder, index):
    from aios_fast.evolve.pairs import build_pairs, split_sentences

    ps = build_pairs(index.passages, encoder, None, ict_per_passage=2, crops_per_passage=1)
    by = ps.by_origin()
    assert by.get("ict", 0) >= len(index.passages) and by.get("crop", 0) >= len(index.passages) - 2
    ids = {p.id for p in index.passages}
    for pair in ps.pairs:
        assert pair.passage_ids and set(pair.passage_ids) <= ids
        text = index.get(pair.passage_ids[0]).text
        if pair.origin == "ict":
            assert pair.query in split_sentences(text)
        else:  # a crop: both spans are word runs of the passage
            assert pair.query.split()[0] in text and pair.answer.split()[-1] in text
    # ICT removes the query sentence from its answer most of the time (kept with p = 0.1)
    ict = [p for p in ps.pairs if p.origin == "ict"]
    removed = sum(p.query not in p.answer for p in ict)
    assert removed >= 0.7 * len(ict)
    queries = [" ".join(p.query.lower().split()) for p in ps.pairs]
    assert len(queries) == len(set(queries))   # exact duplicates removed


def test_ict_queries_are_never_held_by_another_passage(index):
    """Consecutive chunks overlap; a sentence of the overlap as an ICT query would sit verbatim in
    a negative (training) or a distractor (gate). On this domain about a fifth of the sentences
    that could be chosen are shared, so the rule really bites."""
    from aios_fast.evolve.pairs import _Elsewhere, inverse_cloze_pairs, split_sentences

    elsewhere = _Elsewhere(index.passages)
    eligible = [(p.id, s) for p in index.passages for s in split_sentences(p.text) if len(s.split()) >= 6]
    assert sum(elsewhere(pid, s) for pid, s in eligible) >= 0.1 * len(eligible)
    for seed in (0, 1, 2):
        pairs = inverse_cloze_pairs(index.passages, 3, seed=seed)
        assert len(pairs) >= 2 * len(index.passages)
        for pair in pairs:
            others = [q.text for q in index.passages if q.id != pair.passage_ids[0]]
            assert not any(pair.query in t for t in others), pair.query
    # the pool counts too: a sentence of a passage outside the topic's passages is excluded
    first, rest = index.passages[:5], index.passages[5:]
    with_pool = {p.query for p in inverse_cloze_pairs(first, 9, seed=0, pool=rest)}
    assert with_pool and not any(q in t.text for q in with_pool for t in rest)


# ------------------------------------------------------------------ thin data (fast-ish)
def test_thin_data_gives_no_card_with_reason(encoder, tmp_path):
    from aios_fast.evolve.distiller import CloudDistiller
    from aios_fast.route.library import SkillLibrary

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "one.md").write_text("The Harbour branch closes at 17. It is shut on Mondays.\n")
    lib = SkillLibrary(tmp_path / "lib", encoder=encoder)
    res = CloudDistiller(encoder, lib).distill_topic(["when is the harbour branch open"], None, docs=docs)
    assert res.card is None and res.entry is None and not lib.list()
    assert "thin data" in res.reason
    assert res.report["passed"] is False and "ground" in res.report["timings"]


def test_no_grounding_is_refused(encoder, tmp_path):
    from aios_fast.evolve.distiller import CloudDistiller

    res = CloudDistiller(encoder).distill_topic("how do I renew a book", None)
    assert res.card is None and "no grounding" in res.reason


# ------------------------------------------------------------------ the gate
def test_bootstrap_lower_bound_is_noise_aware():
    import numpy as np

    from aios_fast.errors import InputError
    from aios_fast.evolve.distiller import bootstrap_lower_bound

    assert bootstrap_lower_bound(np.zeros(40)) == 0.0                   # no change: not > 0
    one_lucky = np.r_[np.zeros(39), 1.0]                                # one question moved
    assert bootstrap_lower_bound(one_lucky) <= 0.0
    broad = np.r_[np.full(20, 0.5), np.zeros(20)]                       # half of them moved up
    assert bootstrap_lower_bound(broad) > 0.15
    with pytest.raises(InputError, match="need a 1-D array"):
        bootstrap_lower_bound([0.1])


def test_cluster_bootstrap_counts_passages_not_questions():
    """Ten questions about each of 4 passages: one passage that moved a lot looks significant when
    the 40 questions are resampled one by one, not when the 4 passages are resampled."""
    import numpy as np

    from aios_fast.errors import InputError
    from aios_fast.evolve.distiller import bootstrap_lower_bound

    rng = np.random.default_rng(0)
    d = np.r_[0.6 + 0.05 * rng.standard_normal(10), 0.02 * rng.standard_normal(30)]
    passages = [f"p{i // 10}" for i in range(40)]
    assert bootstrap_lower_bound(d) > 0.05                                    # iid: "significant"
    assert bootstrap_lower_bound(d, clusters=passages) <= 0.0                 # by passage: not
    spread = np.r_[[0.15 + 0.05 * rng.standard_normal(10) for _ in range(4)]].ravel()
    assert bootstrap_lower_bound(spread, clusters=passages) > 0.1              # every passage moved
    # a weighted mean: clusters of unequal size count by their questions
    assert bootstrap_lower_bound([1.0, 1.0, 1.0, 0.0], confidence=0.5, clusters="aaab") == pytest.approx(0.75, abs=0.26)
    with pytest.raises(InputError, match="cluster labels"):
        bootstrap_lower_bound(d, clusters=passages[:5])
    with pytest.raises(InputError, match="2 clusters"):
        bootstrap_lower_bound(d, clusters=["one"] * 40)


def test_loss_gate_needs_the_loss_to_fall_and_mrr_to_hold():
    """The decision from paired per-question figures: 12 passages x 3 questions."""
    import numpy as np

    from aios_fast.evolve.distiller import DistillConfig, _decide, _Ranks
    from aios_fast.learn.gate import ValidationReport

    v = ValidationReport(kind="encoder", metric="recall@1", before=0.5, after=0.5, margin=0.0, drift=0.01,
                         max_drift=0.15, passed=True, reasons=[], details={}, n_heldout=36, n_guard=24)
    rng = np.random.default_rng(1)
    clusters = [f"p{i // 3}" for i in range(36)]
    rr = rng.choice([1.0, 0.5, 1 / 3, 0.0], size=36)
    nll = rng.uniform(0.5, 3.0, size=36)
    base = _Ranks(rr, rr == 1.0, nll)

    def ranks(rr2, nll2):
        return _Ranks(rr2, rr2 == 1.0, nll2)

    cfg = DistillConfig(gate_statistic="loss")
    lower = nll - 0.2 - 0.05 * rng.random(36)                    # every question's loss falls
    ok = _decide(base, ranks(rr, lower), clusters, v, cfg)
    assert ok.passed and ok.details["loss_reduction_lower_bound"] > 0.15
    worse_rank = np.where(np.arange(36) % 4 == 0, 0.0, rr)       # ... but answers drop out of the top 10
    bad = _decide(base, ranks(worse_rank, lower), clusters, v, cfg)
    assert not bad.passed and "mrr@10 went down" in bad.reasons[0]
    noisy = nll + np.where(np.arange(36) < 3, -3.0, 0.02)         # one passage moved, the rest got worse
    assert not _decide(base, ranks(rr, noisy), clusters, v, cfg).passed
    # the MRR@10 statistic: an unchanged ranking is refused even though the loss fell
    assert not _decide(base, ranks(rr, lower), clusters, v, DistillConfig(gate_statistic="mrr")).passed
    one = _decide(base, ranks(rr, lower), ["p0"] * 36, v, cfg)   # one passage: no estimate of the noise
    assert not one.passed and one.details["loss_reduction_lower_bound"] is None
    assert "(1 passages)" in one.reasons[0] and "-inf is not above 0" in one.reasons[0]
    drifted = _decide(base, ranks(rr, lower), clusters,
                      ValidationReport(**{**v.__dict__, "reasons": ["drift 0.2 > 0.15"]}), cfg)
    assert not drifted.passed and drifted.reasons == ["drift 0.2 > 0.15"]


@pytest.mark.slow
def test_gate_refuses_a_card_that_does_not_help(encoder, core_index):
    """A card taught the wrong passage for each held-out question is refused by the bootstrap
    gate, with the figures in the reason (a card that changes nothing: ``bootstrap_lower_bound``
    of zeros is 0). Shuffling only the training pairs' answers is not a harmful card: it moved
    the training passages (the gate's distractors) and raised held-out MRR@10 on some seeds."""
    from aios_fast.evolve.distiller import CloudDistiller, DistillConfig, _NoCard
    from aios_fast.evolve.pairs import inverse_cloze_pairs
    from aios_fast.learn.trainer import LoRATrainer

    index = core_index
    pairs = inverse_cloze_pairs(index.passages, 3, seed=3)
    assert len(pairs) >= 24, len(pairs)
    held, train = pairs[:len(pairs) // 3], pairs[len(pairs) // 3:]

    def elsewhere(i):   # the next held-out pair about another passage
        j = (i + 1) % len(held)
        while held[j].passage_ids == held[i].passage_ids:
            j = (j + 1) % len(held)
        return held[j].answer

    wrong = [(p.query, elsewhere(i)) for i, p in enumerate(held)]
    assert all(a != p.answer for (_, a), p in zip(wrong, held))
    d = CloudDistiller(encoder, config=DistillConfig(gate_statistic="mrr"), index=index)
    distractors = [p.answer for p in train]
    card, _ = LoRATrainer(encoder).train(wrong, rank=4, epochs=4, lr=1e-2, batch_size=8, seed=0,
                                         name="bad", progress=False)
    report = {"timings": {}, "stages": []}
    with pytest.raises(_NoCard, match="bootstrap lower bound") as why:
        d._gate(card, held, distractors, report)
    gate = report["gate"]
    assert gate["metric"] == "mrr@10" and not gate["passed"]
    det = gate["details"]
    assert det["gate_statistic"] == "mrr" and det["mrr@10_gain_lower_bound"] <= 0.0, str(why.value)
    assert det["heldout_passages"] == len({p.passage_ids[0] for p in held})
    assert det["loss_after"] > det["loss_before"]           # the wrong answers really hurt
    assert gate["after"] < gate["before"]
    # the default statistic, the held-out loss, refuses it too
    d.config = DistillConfig()
    assert d.config.gate_statistic == "loss"
    report = {"timings": {}, "stages": []}
    with pytest.raises(_NoCard, match="bootstrap lower bound of the reduction"):
        d._gate(card, held, distractors, report)
    assert report["gate"]["details"]["loss_reduction_lower_bound"] < 0.0


def test_studied_heldout_keeps_every_held_passage_in_training(core_index):
    """``gate_heldout="studied"`` asks new questions about passages the card studies: in the single split
    and in every cross-fitted fold, each held-out question's passage keeps training pairs, the
    held-out ICT sentence is not in its passage's answer text, and the folds hold out each
    eligible question of a multi-pair passage exactly once. "questions" (the default) does the same
    with the teacher questions alone; "unseen" holds out whole passages: nothing about them in
    training."""
    import random

    from aios_fast.errors import InputError
    from aios_fast.evolve.distiller import DistillConfig, _eligible, _fold_plan, _studied_heldout
    from aios_fast.evolve.pairs import Pair, PairSet, inverse_cloze_pairs

    ict = inverse_cloze_pairs(core_index.passages, 3, seed=3)
    by_pid = {}
    for p in ict:
        by_pid.setdefault(p.passage_ids[0], []).append(p)
    # teacher questions: two about each of the first passages, one about a passage with nothing else
    pids = sorted(by_pid)
    teacher = [Pair(f"what does passage {pid} say, question {j}?", by_pid[pid][0].answer, (pid,), "teacher", 0.5)
               for pid in pids[:4] for j in range(2)]
    lonely = Pair("a question about a passage with no other pair?", "lonely passage text", ("lonely",), "teacher", 0.5)
    ps = PairSet(pairs=teacher + [lonely] + ict)
    eligible = _eligible(ps)
    assert len(eligible) == len(ps.pairs)

    def trained(held):
        return {ps.pairs[i].passage_ids[0] for i in range(len(ps.pairs)) if i not in held}

    held = _studied_heldout(ps, eligible, 0.5, random.Random(0))
    assert held and trained(held) >= {ps.pairs[i].passage_ids[0] for i in held}
    assert len(ps.pairs) - 1 not in held and all(ps.pairs[i].passage_ids != ("lonely",) for i in held)
    multi = {pid for pid, ps_ in by_pid.items() if len(ps_) >= 2}
    held_ict = [ps.pairs[i] for i in held if ps.pairs[i].origin == "ict"]
    assert {p.passage_ids[0] for p in held_ict} == multi and len(held_ict) == len(multi)
    # half of the 9 teacher questions (4), less the lonely one if it was drawn
    assert sum(ps.pairs[i].origin == "teacher" for i in held) in (3, 4)
    for folds in (2, 3, 4):
        plan = _fold_plan(ps, folds, "studied", seed=1)
        everyone = [i for h, _ in plan for i in h]
        assert len(everyone) == len(set(everyone)) and all(not excluded for _, excluded in plan)
        assert set(everyone) == {i for i in eligible if ps.pairs[i].passage_ids != ("lonely",)}
        for h, _ in plan:
            assert trained(set(h)) >= {ps.pairs[i].passage_ids[0] for i in h}
    # "questions" (the default): the teacher questions alone, dealt the same way; no ICT sentence
    asked = _eligible(ps, "questions")
    assert {ps.pairs[i].origin for i in asked} == {"teacher"} and len(asked) == len(teacher) + 1
    held = _studied_heldout(ps, asked, 0.5, random.Random(0))
    assert held and all(ps.pairs[i].origin == "teacher" for i in held)
    assert trained(held) >= {ps.pairs[i].passage_ids[0] for i in held}
    for folds in (2, 4):
        plan = _fold_plan(ps, folds, "questions", seed=1)
        everyone = [i for h, _ in plan for i in h]
        assert sorted(everyone) == [i for i in asked if ps.pairs[i].passage_ids != ("lonely",)]
        assert all(not excluded for _, excluded in plan)
        for h, _ in plan:
            assert trained(set(h)) >= {ps.pairs[i].passage_ids[0] for i in h}
    unseen = _fold_plan(ps, 3, "unseen", seed=1)
    for h, excluded in unseen:
        assert excluded == {ps.pairs[i].passage_ids[0] for i in h}
    assert sorted(i for h, _ in unseen for i in h) == eligible
    for bad in ({"heldout": "both"}, {"folds": 1}, {"folds": True}):
        with pytest.raises(InputError):
            _fold_plan(ps, **{"folds": 3, **bad})
    with pytest.raises(InputError, match="DistillConfig.gate_heldout"):
        DistillConfig(gate_heldout="passages")
    assert DistillConfig().gate_heldout == "questions" and DistillConfig().heldout_share == 0.33
    assert DistillConfig(gate_heldout="unseen").heldout_share == 0.25
    assert DistillConfig(gate_heldout="studied").heldout_share == 0.33
    assert DistillConfig(gate_heldout="studied", heldout_fraction=0.5).heldout_share == 0.5
    for bad in (0.0, 1.0, "0.3"):
        with pytest.raises(InputError, match="DistillConfig.heldout_fraction"):
            DistillConfig(heldout_fraction=bad)


def test_questions_gate_falls_back_to_unseen_without_teacher_questions(encoder):
    """``gate_heldout="questions"`` needs teacher questions; document pairs alone (no teacher) are
    gated on unseen passages instead, and any other choice is kept as it is."""
    from aios_fast.evolve.distiller import CloudDistiller
    from aios_fast.evolve.pairs import Pair, PairSet

    d = CloudDistiller(encoder)
    docs_only = PairSet(pairs=[Pair("a sentence of the passage", "the passage", ("p",), "ict")])
    assert d.config.gate_heldout == "questions" and d._gate_config(docs_only).gate_heldout == "unseen"
    assert d.config.gate_heldout == "questions"          # the distiller's own config is left alone
    asked = PairSet(pairs=docs_only.pairs + [Pair("what does the passage say?", "the passage", ("p",), "teacher")])
    assert d._gate_config(asked) is d.config
    assert CloudDistiller(encoder, config={"gate_heldout": "studied"})._gate_config(docs_only).gate_heldout == "studied"


def test_gate_folds_is_validated():
    from aios_fast.errors import InputError
    from aios_fast.evolve.distiller import DistillConfig

    for bad in (-1, True, 2.0, "4"):
        with pytest.raises(InputError, match="DistillConfig.gate_folds"):
            DistillConfig(gate_folds=bad)
    assert DistillConfig().gate_folds == 4 and DistillConfig(gate_folds=1).gate_folds == 1


@pytest.mark.slow
def test_cross_fitted_gate_holds_out_every_question_once(encoder, core_index):
    """K folds over the question-bearing passages: each fold's card is trained without that
    fold's passages, every teacher/ICT question is measured exactly once, and the kept card is
    trained on all pairs and carries a validation report bound to its own tensors. A recipe that
    cannot move the model (lr 1e-9) is refused on the pooled figures."""
    from aios_fast.evolve.distiller import CloudDistiller, DistillConfig, _NoCard, _questions_by_passage
    from aios_fast.evolve.pairs import PairSet, inverse_cloze_pairs
    from aios_fast.learn.gate import ValidationReport

    pairs = inverse_cloze_pairs(core_index.passages, 3, seed=3)
    ps = PairSet(pairs=list(pairs))
    eligible = [i for i, p in enumerate(pairs) if p.origin in ("teacher", "ict")]
    n_passages = len(_questions_by_passage(ps, eligible))
    assert n_passages >= 6, n_passages
    events = []
    cfg = {"epochs": 2, "gate_folds": 3, "margin": None, "gate_heldout": "unseen"}
    d = CloudDistiller(encoder, config=cfg, index=core_index, on_event=lambda s, i: events.append((s, i)))
    report = {"timings": {}, "stages": []}
    try:
        card = d._crossfit(ps, core_index.passages, "xfit", report)
    except _NoCard:
        card = None
    folds = [i for s, i in events if s == "fold"]
    assert [f["fold"] for f in folds] == [1, 2, 3] and all(f["folds"] == 3 for f in folds)
    assert sum(f["heldout"] for f in folds) == len(eligible) == report["split"]["heldout"]
    assert sum(f["passages"] for f in folds) == n_passages
    for f in folds:   # a fold's card never saw a pair of its held-out passages
        assert f["train"] <= len(pairs) - f["heldout"]
    gate = report["gate"]
    assert gate["n_heldout"] == len(eligible) and gate["details"]["cross_fit_folds"] == 3
    assert gate["details"]["heldout_passages"] == n_passages and gate["metric"] == "mrr@10"
    if card is not None:              # kept here: LB +0.004 (measured 2026-12-03)
        # the final card was trained on all pairs and the verdict is bound to its tensors
        assert d.last_training is not None and report["training"]["steps"] > 0
        rep = ValidationReport.from_json(card.metadata["validation"])
        assert rep.passed and rep.card_checksum == card.tensor_checksum() == gate["card_checksum"]
        assert rep.n_guard > 0
    else:                             # refused on the pooled figures: no final card was trained
        assert d.last_training is None and "training" not in report and gate["card_checksum"] is None
    # the same folds with a recipe that does not learn: refused with the cross-fitted figures,
    # before the card on all pairs is trained (its drift could not change the verdict)
    still = CloudDistiller(encoder, config={**cfg, "lr": 1e-9}, index=core_index)
    still_report = {"timings": {}, "stages": []}
    with pytest.raises(_NoCard, match=r"3-fold cross-fitted\) questions"):
        still._crossfit(ps, core_index.passages, "still", still_report)
    assert still.last_training is None and "training" not in still_report
    refused = still_report["gate"]
    assert not refused["passed"] and refused["card_checksum"] is None and refused["n_guard"] == 0
    assert refused["n_heldout"] == len(eligible) and refused["details"]["cross_fit_folds"] == 3
    assert abs(refused["after"] - refused["before"]) < 1e-3   # lr 1e-9 leaves the ranks as they were
    # evolve's table says the drift was not measured rather than printing a 0
    from rich.console import Console

    from aios_fast.cli.evolve import _table

    con = Console(record=True, width=240)
    _table(con, {"before": {"probe_confidence": 0.5}, "after": {"probe_confidence": 0.5},
                 "learning": {"jobs": [{"gate": refused, "reason": "refused"}]}}, has_eval=False)
    text = con.export_text()
    assert "3-fold cross-fitted mrr@10 (unseen passages)" in text and "REFUSED" in text
    # the default loss rule shows the loss and its bound, and labels the MRR@10 bound as not deciding
    assert refused["details"]["gate_statistic"] == "loss"
    assert "3-fold cross-fitted contrastive loss" in text and "loss reduction" in text
    assert "(reported; its mean must not fall)" in text
    assert "not measured (no card trained)" in text


# ------------------------------------------------------------------ the skill is real
@pytest.mark.slow
def test_local_teacher_card_raises_human_recall(encoder, index, tmp_path, two_threads):
    """The card trained from the documents with LocalTeacher raises recall@1 of MiniLM on the
    held-out, human-written questions of a domain the defaults were not tuned on."""
    from aios_fast.evolve.demo import load_eval, retrieval_eval
    from aios_fast.evolve.distiller import CloudDistiller
    from aios_fast.evolve.teachers import LocalTeacher
    from aios_fast.learn.qa_logger import QALogger
    from aios_fast.lora import LoRAManager
    from aios_fast.route.library import SkillLibrary

    lib = SkillLibrary(tmp_path / "lib", encoder=encoder)
    qa = QALogger(tmp_path / "qa")
    hooked = []
    d = CloudDistiller(encoder, lib, qa, index=index)
    d.publish_hooks.append(hooked.append)
    res = d.distill_topic(_queries(), LocalTeacher(), skill_name="marrowby")
    rep = res.report
    g = rep.get("gate") or {}
    print(f"\nmarrowby distill: {res.reason or 'kept'}; split {rep.get('split')}; gate {g.get('metric')} "
          f"{g.get('before', float('nan')):.3f} -> {g.get('after', float('nan')):.3f}, "
          f"bootstrap LB mrr {(g.get('details') or {}).get('mrr@10_gain_lower_bound')}, loss "
          f"{(g.get('details') or {}).get('loss_reduction_lower_bound')}, drift {g.get('drift')}")
    assert rep["pairs"]["teacher"]["asked"] > 0 and "gate" in rep
    assert res.ok, rep.get("reason")
    gate = rep["gate"]
    assert gate["passed"] and gate["metric"] == "mrr@10" and gate["after"] > gate["before"]
    # the default statistic: the held-out loss falls beyond noise and MRR@10 does not fall
    assert gate["details"]["gate_statistic"] == "loss" and gate["details"]["loss_reduction_lower_bound"] > 0.0
    # cross-fitted: every teacher question (about a passage with other pairs) was held out of one
    # fold's card, and only teacher questions: the gate asks what users ask, not ICT sentences
    questions = rep["pairs"]["kept"]["teacher"]
    assert gate["details"]["cross_fit_folds"] == 4 and 8 <= gate["n_heldout"] <= questions
    assert gate["details"]["gate_heldout"] == "questions" and rep["split"]["heldout_by_origin"] == {
        "teacher": gate["n_heldout"]}
    assert len(rep["folds"]) == 4 and rep["training"]["steps"] > 0
    assert rep["pairs"]["kept"].get("teacher", 0) >= 3       # the tiny teacher contributed
    assert rep["pairs"]["teacher"]["asked"] >= rep["pairs"]["teacher"]["kept"]
    entry = lib.get("marrowby")
    assert hooked == [entry] and entry.passed and entry.origin == "trained"
    sources = json.loads(entry.metadata["sources"])
    assert {Path(s["source"]).name for s in sources} <= {p.name for p in DOCS.iterdir()}
    assert all(len(s["hash"]) == 64 for s in sources)
    # every kept pair is in the QA log with its origin and passage ids
    rows = qa.collect().to_pylist()
    assert len(rows) == rep["qa_logged"] == rep["pairs"]["total"]
    assert all(r["domain"] == "marrowby" and r["source"].startswith("distill:") for r in rows)
    # the human-written eval, never seen by the teacher or the trainer
    items = load_eval(DATA / "eval.jsonl")
    before = retrieval_eval(encoder, index.passages, items)
    with LoRAManager(encoder.model).applied(lib.load_card(entry)):
        after = retrieval_eval(encoder, index.passages, items)
    print(f"human eval ({before['n']} q): recall@1 {before['recall@1']:.3f} -> {after['recall@1']:.3f}, "
          f"MRR@10 {before['mrr@10']:.3f} -> {after['mrr@10']:.3f}")
    assert after["recall@1"] > before["recall@1"], (before, after)
    assert after["mrr@10"] >= before["mrr@10"]


# ------------------------------------------------------------------ teacher faults
@pytest.mark.parametrize("fault", ["garbage", "stall", "rate_limited", "drop"])
def test_faulty_teacher_gives_no_card_and_says_why(fault, fault_server, encoder, index, tmp_path):
    from servers import fault_server as fs

    from aios_fast.evolve.distiller import CloudDistiller
    from aios_fast.evolve.teachers import OpenAICompatibleProvider, TeacherBudget
    from aios_fast.route.library import SkillLibrary

    make = {"garbage": lambda: fs.garbage(), "stall": lambda: fs.stall(3.0),
            "rate_limited": lambda: fs.rate_limited(0.05), "drop": lambda: fs.drop()}[fault]
    fault_server.script(default=make())
    teacher = OpenAICompatibleProvider(fault_server.base_url, "m", timeout=0.5, max_retries=1,
                                       budget=TeacherBudget(max_requests=12, max_seconds=20))
    lib = SkillLibrary(tmp_path / "lib", encoder=encoder)
    res = CloudDistiller(encoder, lib, config={"min_teacher_pairs": 3}, index=index).distill_topic(
        _queries(), teacher, skill_name="faulty")
    assert res.card is None and not lib.list()
    assert "teacher" in res.reason and "usable question" in res.reason
    assert res.report["pairs"]["teacher"]["kept"] == 0
    assert res.report["pairs"]["teacher"]["n_errors"] >= 1 or res.report["pairs"]["rejected"]
    assert len(fault_server.requests) >= 1


def test_garbage_questions_are_rejected_by_reason(fault_server, encoder, index, tmp_path):
    """A server that answers 200 with well-formed but useless content: every reply is judged
    and rejected with a reason; nothing becomes training data."""
    from servers import fault_server as fs

    from aios_fast.evolve.distiller import CloudDistiller
    from aios_fast.evolve.teachers import OpenAICompatibleProvider

    fault_server.script(fs.ok("As an AI language model I cannot answer."), fs.ok("Sure!"),
                        fs.ok("What does the passage say?"), default=fs.ok("What is the GDP of Peru in 1990?"))
    teacher = OpenAICompatibleProvider(fault_server.base_url, "m", timeout=5, max_retries=0)
    res = CloudDistiller(encoder, None, index=index).distill_topic(_queries(), teacher, num_pairs=6)
    rej = res.report["pairs"]["rejected"]
    assert res.card is None and res.report["pairs"]["teacher"]["kept"] == 0
    assert res.report["pairs"]["teacher"]["asked"] == 6
    judged = {k: v for k, v in rej.items() if k not in ("duplicate", "near_duplicate")}  # dedup also counts ICT
    assert sum(judged.values()) == 6               # every reply judged and refused, with a reason
    assert rej.get("meta", 0) >= 1 and rej.get("no_overlap", 0) + rej.get("off_topic", 0) >= 3


# ------------------------------------------------------------------ the journal
_CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from aios_fast.engines import SentenceEncoder
    from aios_fast.evolve.distiller import SkillDistiller
    from aios_fast.evolve.jobs import LearningRequest
    from aios_fast.route.library import SkillLibrary

    lib_dir, docs, crash_at = sys.argv[1], sys.argv[2], sys.argv[3]
    queries = [l for l in Path(sys.argv[4]).read_text().splitlines() if l.strip() and not l.startswith("#")]

    class Node:   # the parts of a SkillNode a SkillDistiller uses
        encoder = SentenceEncoder()
        library = SkillLibrary(lib_dir, encoder=encoder)

    if crash_at == "add":          # killed after the card is staged, before it enters the library
        SkillLibrary.add = lambda *a, **k: os._exit(9)
    elif crash_at == "done":       # killed after the library add, before the journal says done
        from aios_fast.evolve.distiller import DistillJournal
        real = DistillJournal.set
        def set_(self, topic, **st):
            if st.get("state") == "done":
                os._exit(9)
            return real(self, topic, **st)
        DistillJournal.set = set_
    # fixed margin -1: the gate's verdict is not under test here, the journal is
    d = SkillDistiller(Node(), tier="leaf", teacher=False, docs=docs,
                       config={"margin": -1.0, "gate_rule": "margin"})
    out = d.learn(LearningRequest("topic-a", tuple(queries), request_id="r1"))
    print("LEARNT", out.entry and out.entry.key)
""")


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["add", "done"])
def test_killed_distillation_resumes_without_duplicates(crash_at, encoder, core_docs, tmp_path):
    from aios_fast.evolve.distiller import SkillDistiller
    from aios_fast.evolve.jobs import LearningRequest
    from aios_fast.learn.qa_logger import QALogger
    from aios_fast.route.library import SkillLibrary

    lib_dir = tmp_path / "lib"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(lib_dir), str(core_docs), crash_at,
                           str(DATA / "queries.txt")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 9, proc.stderr[-3000:]
    journal = json.loads((lib_dir / "jobs" / "topic-a.json").read_text())
    assert journal["state"] == "staged"
    qa_before = len(QALogger(lib_dir / "qa").collect())
    assert qa_before > 0                      # the QA records were durable before training

    class Node:
        pass
    node = Node()
    node.encoder, node.library = encoder, SkillLibrary(lib_dir, encoder=encoder)
    d = SkillDistiller(node, tier="leaf", teacher=False, docs=str(core_docs), config={"margin": -1.0})
    req = LearningRequest("topic-a", tuple(_queries()))
    out = d.learn(req)
    assert out.entry is not None and out.tier == 2 and "resumed" in out.report
    assert len(node.library.list(all_versions=True)) == 1
    again = d.learn(req)                      # a second delivery of the same job: no new card
    assert again.entry.key == out.entry.key and again.report.get("resumed") == "already done"
    assert len(node.library.list(all_versions=True)) == 1
    assert len(QALogger(lib_dir / "qa").collect()) == qa_before    # none lost, none doubled
    staged = Path(journal["card"])
    assert node.library.get(out.entry.name).content_hash == __import__("hashlib").sha256(
        staged.read_bytes()).hexdigest()


# ------------------------------------------------------------------ the learner's tiers
def test_library_source_serves_tier1_before_training(encoder, tmp_path):
    """A skill already in the library whose examples route the request is returned by Tier 1:
    nothing is trained."""
    import torch

    from aios_fast.cards import LoRACard
    from aios_fast.evolve.distiller import SkillDistiller
    from aios_fast.evolve.jobs import LearningRequest
    from aios_fast.route.library import SkillLibrary

    lib = SkillLibrary(tmp_path / "lib", encoder=encoder)
    key = "encoder.layer.0.attention.self.query"
    card = LoRACard(name="libraries", rank=2, alpha=2.0, target_modules=[key],
                    weights_A={key: torch.randn(2, 384) * 0.01}, weights_B={key: torch.zeros(384, 2)})
    lib.add(card, _queries() + ["how do I renew my library loans", "what are marrowby late fees"])

    class Node:
        pass
    node = Node()
    node.encoder, node.library = encoder, lib
    d = SkillDistiller(node, tier="leaf", teacher=False, docs=None)
    out = d.learn(LearningRequest("t1", ("how can I renew a marrowby library book", "marrowby late fee for books")))
    assert out.tier == 1 and out.entry.name == "libraries"
    assert out.report["tiers"]["1"]["acquired"] == "libraries@v1"


def test_no_tier_reports_why(encoder, tmp_path):
    from aios_fast.evolve.distiller import SkillDistiller
    from aios_fast.evolve.jobs import LearningRequest
    from aios_fast.route.library import SkillLibrary

    class Node:
        pass
    node = Node()
    node.encoder, node.library = encoder, SkillLibrary(tmp_path / "lib", encoder=encoder)
    out = SkillDistiller(node, tier="hub", teacher=False).learn(LearningRequest("t", ("anything at all",)))
    assert out.entry is None and out.tier is None
    r = out.report["reason"]
    assert "tier 1:" in r and "no documents" in r and "Super node" in r
    assert json.loads((node.library.directory / "jobs" / "t.json").read_text())["state"] == "failed"
