"""SkillNode: per-call skills with real trained cards (threads included), one encoder forward
when no skill applies, the background learning worker, and damaged cards skipped."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from aios_fast import LearningRequest, LoRAFormat, SkillNode
from aios_fast.evolve.jobs import LearnOutcome
from aios_fast.lora.random import random_card

DATA = json.loads((Path(__file__).parent / "data" / "routing" / "domains.json").read_text())
D = DATA["domains"]
BEES = ["how do I get started with beekeeping as a hobby", "what equipment does a beginner beekeeper need",
        "how to treat varroa mites in a bee colony", "how do I know if my beehive has a queen",
        "how often should I inspect my beehive", "signs that a bee colony is queenless"]


@pytest.fixture(scope="module")
def cards(encoder, tmp_path_factory):
    """Two real skills trained with LoRATrainer on tiny data (a few seconds each), saved."""
    from aios_fast import LoRATrainer

    out = {}
    trainer = LoRATrainer(encoder)
    for name in ("cooking", "car_maintenance"):
        qs = D[name]["register"]
        pairs = [(q, f"{D[name]['description']}. {a}") for q, a in zip(qs, qs[1:] + qs[:1])]
        card, _ = trainer.train(pairs, rank=4, epochs=2, batch_size=5, lr=5e-3, name=name, progress=False)
        path = tmp_path_factory.mktemp("cards") / f"{name}.lora.arrow"
        LoRAFormat.save(card, path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def template(encoder, cards, tmp_path_factory):
    """A library with the two trained skills and two more (cards not applied), embedded once;
    each test works on its own copy."""
    from aios_fast import SkillLibrary

    lib = SkillLibrary(tmp_path_factory.mktemp("template") / "lib", encoder=encoder)
    for name, path in cards.items():
        lib.add(path, D[name]["register"], D[name]["description"])
    for name in ("travel", "gardening"):      # more skills: a realistic router
        lib.add(random_card({"encoder.layer.0.attention.self.query": (384, 384)}, name=name, rank=2),
                D[name]["register"])
    return lib.directory


def make_node(encoder, tmp_path, template, **kw):
    shutil.copytree(template, tmp_path / "lib")
    return SkillNode(encoder=encoder, library_dir=tmp_path / "lib", **kw)


class ForwardCounter:
    def __init__(self, model):
        self.n = 0
        self.h = model.register_forward_pre_hook(lambda *a, **k: self._inc())

    def _inc(self):
        self.n += 1

    def close(self):
        self.h.remove()


@pytest.mark.slow  # trains the two cards (module fixture): ~10 s idle, a minute on a loaded machine
def test_concurrent_calls_with_different_skills_equal_single_threaded(encoder, template, tmp_path):
    node = make_node(encoder, tmp_path, template)
    try:
        jobs = {"cooking": ["How do I keep pasta from sticking together?", "a bowl of spaghetti"],
                "car_maintenance": ["How do I jump start a car with a dead battery?", "jumper cables"]}
        single = {}
        for skill, texts in jobs.items():
            out, route = node.encode_with_lora(texts, return_route=True)
            assert route.skill == skill, route
            plain = encoder.encode(texts)
            assert (out - plain).abs().max() > 1e-3          # the card really changed the output
            single[skill] = out
        results = {k: [] for k in jobs}
        barrier = threading.Barrier(2)

        def run(skill):
            barrier.wait()
            for _ in range(8):
                results[skill].append(node.encode_with_lora(jobs[skill]))

        threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for skill, outs in results.items():
            assert len(outs) == 8
            for o in outs:
                torch.testing.assert_close(o, single[skill], atol=1e-6, rtol=1e-5)
        assert node.manager.list_cards() == []               # scoped: nothing left applied
    finally:
        node.close()


def test_forwards_paid_per_call(encoder, template, tmp_path):
    node = make_node(encoder, tmp_path, template)
    count = ForwardCounter(encoder.model)
    try:
        q = "Who won the football world cup in 2010?"
        out, route = node.encode_with_lora(q, return_route=True)
        assert route.skill is None and count.n == 1          # the routing embedding is the answer
        torch.testing.assert_close(out, encoder.encode([q]))
        count.n = 0
        out, route = node.encode_with_lora("How do I boil an egg for a runny yolk?", return_route=True)
        assert route.skill == "cooking" and count.n == 2     # route, then encode with the card
        count.n = 0
        node.encode_with_lora(["some text", "more text"], intent_query="How do I boil an egg?")
        assert count.n == 2                                  # routing query not among the texts
    finally:
        count.close()
        node.close()


class CardLearner:
    """Learns by returning a card (the node adds it with the request's queries as examples)."""

    def __init__(self, encoder, gate: threading.Event | None = None, fail: bool = False):
        self.encoder, self.gate, self.fail, self.requests = encoder, gate, fail, []

    def learn(self, request):
        self.requests.append(request)
        if self.gate is not None:
            assert self.gate.wait(60)
        if self.fail:
            raise RuntimeError("teacher unreachable")
        return random_card({"encoder.layer.0.attention.self.query": (384, 384)}, name="beekeeping", rank=2)


def test_unsure_queries_become_a_learnt_skill_in_the_background(encoder, template, tmp_path):
    node = make_node(encoder, tmp_path, template, trigger_options={"min_support": 4})
    published = []
    node.publish_hooks.append(published.append)
    try:
        for q in BEES[:5]:
            node.encode_with_lora(q)
        st = node.status()
        assert len(st["pending"]) == 1 and st["running"] == [] and st["learner"] is None
        req = st["pending"][0]
        assert set(req["queries"]) <= set(BEES)
        # the queue waits for a learner; the encode path does not wait for learning
        gate = threading.Event()
        learner = CardLearner(encoder, gate)
        node.set_learner(learner)
        for _ in range(50):
            if node.status()["running"]:
                break
            threading.Event().wait(0.05)
        assert len(node.status()["running"]) == 1
        node.encode_with_lora(BEES[5])                       # returns while the job is blocked
        assert not gate.is_set()
        gate.set()
        assert node.wait_idle(60)
        st = node.status()
        assert st["finished"][-1]["ok"] and st["finished"][-1]["skill"] == "beekeeping@v1"
        assert [e.key for e in published] == ["beekeeping@v1"]
        assert "beekeeping" in node.router.skills
        assert node.router.route(BEES[0]).top == "beekeeping"
        assert len(learner.requests) == 1 and isinstance(learner.requests[0], LearningRequest)
    finally:
        node.close()


def test_failing_learner_backs_off_and_the_worker_survives(encoder, template, tmp_path):
    node = make_node(encoder, tmp_path, template, learner=CardLearner(encoder, fail=True),
                     trigger_options={"min_support": 3, "backoff": 600.0})
    try:
        for q in BEES[:3]:
            node.encode_with_lora(q)
        assert node.wait_idle(60)
        st = node.status()
        assert st["finished"][-1]["ok"] is False and "teacher unreachable" in st["finished"][-1]["reason"]
        topic = [t for t in st["topics"] if t["failures"] == 1]
        assert len(topic) == 1 and topic[0]["state"] == "failed" and topic[0]["retry_at"]
        node.encode_with_lora(BEES[3])
        assert node.status()["decisions"][-1]["reason"] == "backoff"
        # a learner that returns an outcome: the next request succeeds on the same worker
        ok = LearnOutcome(entry=node.library.add(random_card(
            {"encoder.layer.0.attention.self.query": (384, 384)}, name="other", rank=2), ["x y z"]), tier=2)
        node.set_learner(type("L", (), {"learn": lambda self, r: ok})())
        assert node.submit(LearningRequest("t-manual", ("q",)))
        assert node.wait_idle(60) and node.status()["finished"][-1]["ok"]
    finally:
        node.close()


def test_worker_learns_with_its_own_thread_count(encoder, template, tmp_path):
    import torch

    seen = []

    class ThreadsLearner(CardLearner):
        def learn(self, request):
            seen.append(torch.get_num_threads())
            return super().learn(request)

    from aios_fast import InputError

    with pytest.raises(InputError, match="learner_threads must be None or an int >= 1, got 0"):
        SkillNode(encoder=encoder, library_dir=tmp_path / "bad", learner_threads=0, start_worker=False)
    mine = torch.get_num_threads()
    want = 3 if mine != 3 else 2
    node = make_node(encoder, tmp_path, template, learner=ThreadsLearner(encoder), learner_threads=want)
    try:
        assert node.submit(LearningRequest("t-threads", ("q",)))
        assert node.wait_idle(60) and node.status()["finished"][-1]["ok"]
        assert seen == [want]                       # the worker's team, not the caller's
        assert torch.get_num_threads() == mine      # the caller's thread is left as it was
    finally:
        node.close()


def test_corrupt_card_in_the_library_is_skipped_with_a_report(encoder, template, tmp_path):
    node = make_node(encoder, tmp_path, template)
    path = node.library.get("cooking").path
    node.close()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    node = SkillNode(encoder=encoder, library_dir=tmp_path / "lib")
    try:
        assert "cooking" not in [s["name"] for s in node.list_skills()]
        assert any("cooking@v1" in p for p in node.status()["problems"])
        q = "How do I keep pasta from sticking together?"
        out = node.encode_with_lora(q)                      # served, without the damaged skill
        assert out.shape == (1, 384)
        assert node.router.route(q).top != "cooking"
    finally:
        node.close()


def test_node_bad_input_and_hooks(encoder, tmp_path):
    from aios_fast import InputError

    node = SkillNode(encoder=encoder, library_dir=tmp_path / "lib", start_worker=False)
    try:
        assert node.encode_with_lora("anything at all").shape == (1, 384)   # empty library
        with pytest.raises(InputError, match="at least one sentence"):
            node.encode_with_lora([])
        with pytest.raises(InputError, match="learn"):
            node.set_learner(object())
        with pytest.raises(InputError, match="LearningRequest"):
            node.submit({"topic_id": "x"})
        with pytest.raises(InputError, match="no such card file"):
            node.register_lora(tmp_path / "nope.lora.arrow")
        assert callable(node.enable_evolution) and callable(node.start_federation)
        assert callable(node.sync_remote_skills)
    finally:
        node.close()


def test_node_picks_up_skills_another_writer_adds(encoder, tmp_path):
    from aios_fast import SkillLibrary

    node = SkillNode(encoder=encoder, library_dir=tmp_path / "lib", start_worker=False)
    node.refresh_interval = 0.0
    try:
        q = D["travel"]["register"][0]
        assert node.encode_with_lora(q, return_route=True)[1].top is None
        other = SkillLibrary(tmp_path / "lib", encoder=encoder)   # e.g. `aios-fast skills add`
        other.add(random_card({"encoder.layer.0.attention.self.query": (384, 384)}, name="travel", rank=2),
                  D["travel"]["register"])
        assert node.encode_with_lora(q, return_route=True)[1].top == "travel"
        assert node.router.refresh() is False                        # unchanged: no rebuild
    finally:
        node.close()
