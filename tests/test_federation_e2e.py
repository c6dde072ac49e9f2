"""Tier 1 end to end: two real nodes on 127.0.0.1 (separate storage, separate keys). A trains
and validates a real skill on the bundled MiniLM (the Ferrowind QA set) and publishes it; B,
whose library cannot serve that topic, gets it through ``FederationSource`` — routed by the
manifest's example texts, fetched, quarantined (hash, trusted signature, format, base model,
B's own gate on its held-out data), added with the bytes unchanged, then routed and applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aios_fast.cards import LoRACard, LoRAFormat, fingerprint_model
from aios_fast.evolve.jobs import LearningRequest, SkillSource
from aios_fast.federation.manager import FederationManager
from aios_fast.federation.source import FederationSource
from aios_fast.learn import LoRATrainer, validate
from aios_fast.lora import LoRAManager
from aios_fast.route.library import SkillLibrary
from aios_fast.route.router import LoRARouter

DATA = Path(__file__).parent / "data" / "qa"
TOKEN = "tier-one-token"


def _jsonl(name):
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


TRAIN = [(r["query"], r["answer"]) if "query" in r else (r["question"], r["answer"])
         for r in _jsonl("ferrowind_train.jsonl")]
HELDOUT = [(r["query"], r["answer"]) if "query" in r else (r["question"], r["answer"])
           for r in _jsonl("ferrowind_heldout.jsonl")]
GUARD = (DATA / "guard.txt").read_text().splitlines()
COOKING = ["How long should I boil an egg?", "What temperature do I bake bread at?",
           "How do I make a roux for gravy?", "Can I freeze cooked rice?",
           "How do I sharpen a kitchen knife?", "What is the best way to caramelise onions?"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]


@pytest.fixture(scope="module")
def published_card(encoder, tmp_path_factory):
    """A's skill: trained, gated, saved; plus the outputs it gives at training time."""
    seen = {}
    probe = [q for q, _ in HELDOUT[:4]]
    card, _ = LoRATrainer(encoder).train(
        TRAIN, objective="contrastive", rank=8, alpha=16, epochs=4, lr=3e-3, batch_size=16, seed=0,
        name="ferrowind", progress=False,
        on_trained=lambda m: seen.setdefault("out", encoder.encode(probe).clone()))
    report = validate(card, encoder, HELDOUT, GUARD, distractors=[a for _, a in TRAIN])
    assert report.passed, report.reasons
    path = LoRAFormat.save(card, tmp_path_factory.mktemp("a-work") / "ferrowind.lora.arrow")
    return path, probe, seen["out"]


def _own_skill(encoder, library: SkillLibrary) -> None:
    """B's one local skill (cooking), so that B's router has something else to say."""
    g = torch.Generator().manual_seed(3)
    keys = [f"encoder.layer.{i}.attention.self.value" for i in range(6)]
    card = LoRACard("cooking", 4, 8.0, ["value"], {k: torch.randn(4, 384, generator=g) * 0.01 for k in keys},
                    {k: torch.zeros(384, 4) for k in keys}, base_fingerprint=fingerprint_model(encoder.model))
    library.add(card, examples=COOKING, description="kitchen questions")


def test_tier1_peer_card_answers_unsure_topic(encoder, published_card, tmp_path):
    path, probe, trained_out = published_card
    fp = fingerprint_model(encoder.model)
    a = FederationManager("alpha", 0, tmp_path / "A", token=TOKEN, discovery=False, base_fingerprint=fp).start()
    lib_b = SkillLibrary(tmp_path / "B" / "library", encoder=encoder)
    _own_skill(encoder, lib_b)
    gate_b = lambda card, manifest: validate(card, encoder, HELDOUT, GUARD,  # noqa: E731
                                              distractors=[x for _, x in TRAIN], store=False)
    b = FederationManager("beta", 0, tmp_path / "B" / "fed", token=TOKEN, discovery=False,
                          base_fingerprint=fp, peers=[a.location], library=lib_b, evaluator=gate_b).start()
    try:
        assert a.key_id != b.key_id
        b.keyring.trust(a.key.public_hex, "alpha")
        m = a.publish(path, examples=[q for q, _ in TRAIN[:24]])
        assert m.validation["passed"] is True and m.base_fingerprint == fp

        router_b = LoRARouter(encoder, lib_b)
        queries = [q for q, _ in HELDOUT[:6]]
        before = router_b.route_many(queries)
        assert all(r.skill is None for r in before), [r.to_dict() for r in before]  # B is unsure

        source = FederationSource(b, encoder, min_confidence=0.5)
        assert isinstance(source, SkillSource)
        request = LearningRequest("ferrowind-topic", tuple(queries))
        cands = source.candidates(request)
        assert [c.name for c in cands] == ["ferrowind"] and cands[0].handle == m.id
        assert cands[0].confidence >= 0.5 and cands[0].info["peer"] == a.location
        # an unrelated request finds nothing on the peer: Tier 2 would take over
        assert source.candidates(LearningRequest("weather", ("Will it rain in Oslo tomorrow?",
                                                             "What is the forecast for Lisbon?"))) == []

        entry = source.acquire(cands[0], lib_b)
        assert entry is not None, source.failures
        assert entry.origin == "peer" and entry.passed and entry.content_hash == m.id
        assert Path(entry.path).read_bytes() == path.read_bytes()  # bytes identical
        assert entry.metadata["validation_source"] == "local" and entry.metadata["publisher"] == a.key_id
        assert entry.validation["after"] > entry.validation["before"]
        checks = b.reports[-1]
        assert checks["ok"] and checks["reason"] == "passed size, hash, signature, format, base_model, gate"
        assert list(b.quarantine.directory.iterdir()) == []

        router_b.refresh()
        after = router_b.route_many(queries)
        assert sum(r.skill == "ferrowind" for r in after) >= 5, [r.to_dict() for r in after]
        assert router_b.route(COOKING[0]).top == "cooking"

        card_b = lib_b.load_card(entry)
        base = encoder.encode(probe).clone()
        with LoRAManager(encoder.model).applied(card_b):
            applied = encoder.encode(probe).clone()
        assert (applied - base).abs().max() > 1e-3          # the card changes B's model
        torch.testing.assert_close(applied, trained_out, atol=1e-5, rtol=0)  # exactly as on A

        # B may now re-share A's card, with A's signature (not its own)
        again = b.publish(entry)
        assert again == m and again.publisher == a.key_id
    finally:
        b.stop()
        a.stop()


def test_local_gate_refuses_a_card_that_does_not_help(encoder, tmp_path):
    """A trusted, well-formed card for the right model that fails B's gate is deleted."""
    fp = fingerprint_model(encoder.model)
    g = torch.Generator().manual_seed(0)
    keys = [f"encoder.layer.{i}.attention.self.query" for i in range(6)]
    noise = LoRACard("ferrowind", 4, 64.0, ["query"], {k: torch.randn(4, 384, generator=g) for k in keys},
                     {k: torch.randn(384, 4, generator=g) for k in keys}, base_fingerprint=fp)
    path = LoRAFormat.save(noise, tmp_path / "noise.lora.arrow")
    a = FederationManager("alpha", 0, tmp_path / "A", token=TOKEN, discovery=False, base_fingerprint=fp).start()
    lib_b = SkillLibrary(tmp_path / "B" / "library", encoder=encoder)
    b = FederationManager("beta", 0, tmp_path / "B" / "fed", token=TOKEN, discovery=False,
                          base_fingerprint=fp, peers=[a.location], library=lib_b,
                          evaluator=lambda card, m: validate(card, encoder, HELDOUT[:8], GUARD[:8], store=False))
    try:
        b.keyring.trust(a.key.public_hex)
        a.publish(path, examples=[q for q, _ in TRAIN[:10]])
        source = FederationSource(b, encoder)
        cands = source.candidates(LearningRequest("t", tuple(q for q, _ in HELDOUT[:4])))
        assert cands and source.acquire(cands[0], lib_b) is None
        assert source.failures[-1]["check"] == "gate" and "local gate" in source.failures[-1]["reason"]
        assert len(lib_b) == 0 and list(b.quarantine.directory.iterdir()) == []
    finally:
        b.stop()
        a.stop()


def test_skillnodes_start_federation_tier1_and_sync(encoder, published_card, tmp_path):
    """Two SkillNodes: A learns a skill and publishes it through its publish hook; B's
    SkillDistiller (Tier 1 only here: no documents, no teacher) gets it from A through the
    federation source that start_federation plugged in; B routes to it and applies it."""
    from aios_fast.evolve.distiller import SkillDistiller
    from aios_fast.evolve.node import SkillNode

    path, probe, trained_out = published_card
    node_a = SkillNode(encoder, tmp_path / "A", start_worker=False)
    node_b = SkillNode(encoder, tmp_path / "B")
    distiller = SkillDistiller(node_b, tier="leaf", teacher=False)
    node_b.set_learner(distiller)
    try:
        fed_a = node_a.start_federation(0, "alpha", token=TOKEN, discovery=False)
        fed_b = node_b.start_federation(0, "beta", token=TOKEN, discovery=False, peers=[fed_a.location],
                                        evaluator=lambda card, m: validate(card, encoder, HELDOUT, GUARD,
                                                                           distractors=[x for _, x in TRAIN],
                                                                           store=False))
        assert fed_a.base_fingerprint == fed_b.base_fingerprint == node_a.base_fingerprint
        fed_b.keyring.trust(fed_a.key.public_hex, "alpha")
        # A learns (here: registers its trained card) and its publish hook shares it
        entry_a = node_a.register_lora(path, examples=[q for q, _ in TRAIN[:24]])
        for hook in node_a.publish_hooks:
            hook(entry_a)
        assert len(fed_a.store) == 1

        assert distiller.sources[-1] is node_b.federation_source
        node_b.submit(LearningRequest("ferrowind", tuple(q for q, _ in HELDOUT[:6])))
        assert node_b.wait_idle(120)
        done = node_b.status()["finished"][-1]
        assert done["ok"] and done["tier"] == 1 and done["skill"] == "ferrowind@v1", done
        out, route = node_b.encode_with_lora(probe, return_route=True)
        assert route.skill == "ferrowind"
        torch.testing.assert_close(out, trained_out, atol=1e-5, rtol=0)
        # B's publish hook re-shares the peer card under A's signature
        assert [m.publisher for m in fed_b.store.manifests()] == [fed_a.key_id]
        # sync_remote_skills: nothing new to fetch; then A offers a second skill (vouched for by
        # A's signed validation report; B has no data on that topic, so no local gate)
        assert node_b.sync_remote_skills() == []
        g = torch.Generator().manual_seed(9)
        keys = [f"encoder.layer.{i}.attention.self.value" for i in range(6)]
        extra = LoRACard("kitchen", 4, 8.0, ["value"], {k: torch.randn(4, 384, generator=g) * 0.01 for k in keys},
                         {k: torch.randn(384, 4, generator=g) * 0.01 for k in keys},
                         base_fingerprint=node_a.base_fingerprint)
        m2 = fed_a.publish(extra, examples=COOKING, validation={"passed": True, "kind": "encoder"})
        fed_b.quarantine.evaluator = None
        added = node_b.sync_remote_skills()
        assert [e.name for e in added] == ["kitchen"] and added[0].content_hash == m2.id
        assert added[0].metadata["validation_source"] == "publisher" and added[0].passed
        assert node_b.router.route(COOKING[1]).top == "kitchen"
    finally:
        node_b.close()
        node_a.close()
        for n in (node_a, node_b):
            if getattr(n, "federation", None) is not None:
                n.federation.stop()
