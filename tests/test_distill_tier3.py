"""Tier 3 of the node's learner on a Super node: probe the encoder on the unsure queries,
extract the delta of a stronger checkpoint where the heat map points, gate it, keep it.

The stronger checkpoint is real: the bundled MiniLM fine-tuned (LoRA, merged) on the test-only
Marrowby documents. Tier 1 has no sources and Tier 2 is configured to find its data too thin,
so the request falls through to Tier 3 the way it does on a node whose teacher fails.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data" / "distill"
DOCS = DATA / "docs"
# one torch thread for the whole module (its fixtures train models): see the root conftest
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stronger(encoder):
    """MiniLM fine-tuned on the documents' inverse-cloze pairs, merged: a state dict."""
    from aios_fast.evolve.distiller import DistillConfig
    from aios_fast.evolve.pairs import inverse_cloze_pairs
    from aios_fast.evolve.retrieval import DocumentIndex
    from aios_fast.learn.trainer import LoRATrainer
    from aios_fast.lora import LoRAManager

    idx = DocumentIndex(encoder)
    idx.add_folder(DOCS)
    pairs = [(p.query, p.answer) for p in inverse_cloze_pairs(idx.passages, 2, seed=11)]
    card, _ = LoRATrainer(encoder).train(pairs, rank=8, epochs=2, lr=2e-3, batch_size=16, seed=0,
                                         target_modules=DistillConfig().target_modules, name="ft",
                                         progress=False)
    model = copy.deepcopy(encoder.model)
    mgr = LoRAManager(model)
    mgr.apply_card(card)
    mgr.merge()
    # saved the way a fine-tuned checkpoint is: the merged weights under the original names
    state = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()}
    return state, model


def _queries():
    return [l for l in (DATA / "queries.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]


def _distiller(node, stronger_model, tier="super"):
    from aios_fast.evolve.distiller import DistillConfig, SkillDistiller

    # Tier 2 must fail: no teacher and a pair minimum no topic reaches
    cfg = DistillConfig(min_pairs=10 ** 6)
    return SkillDistiller(node, tier=tier, sources=[], teacher=False, docs=DOCS, stronger_model=stronger_model,
                          config=cfg)


@pytest.mark.slow
def test_tier3_extracts_the_stronger_models_skill(encoder, stronger, tmp_path):
    from aios_fast.evolve.jobs import LearningRequest
    from aios_fast.evolve.node import SkillNode
    from aios_fast.lora import LoRAManager

    state, strong_model = stronger
    node = SkillNode(encoder=encoder, library_dir=tmp_path / "lib", start_worker=False)
    d = _distiller(node, state)
    out = d.learn(LearningRequest(topic_id="t-marrowby", queries=tuple(_queries())))
    tiers = out.report["tiers"]
    assert "thin data" in tiers["2"]["reason"]
    assert out.tier == 3, out.report
    gate = tiers["3"]["gate"]
    assert gate["passed"] and gate["after"] > gate["before"]
    assert gate["details"]["gate_statistic"] == "loss" and gate["details"]["loss_reduction_lower_bound"] > 0.0
    assert gate["details"]["mrr@10_gain_lower_bound"] > 0.0
    entry = out.entry
    assert entry.origin == "extracted" and entry.passed and node.library.get(entry.name).key == entry.key

    # the extracted card moves the embeddings most of the way to the stronger model's (the rank
    # budget, 16 x rank over the hottest modules, leaves the coldest of the fine-tune's modules out)
    texts = [l for l in (DOCS / "loans.md").read_text().splitlines() if len(l.split()) > 6][:16]
    base = encoder.encode(texts)
    strong_enc = copy.copy(encoder)
    strong_enc.model = strong_model
    target = strong_enc.encode(texts)
    with LoRAManager(encoder.model).applied(node.library.load_card(entry)):
        got = encoder.encode(texts)
    cos_base = torch.nn.functional.cosine_similarity(base, target).mean().item()
    cos_ext = torch.nn.functional.cosine_similarity(got, target).mean().item()
    assert (1 - cos_ext) < 0.6 * (1 - cos_base), (cos_base, cos_ext)


@pytest.mark.slow
def test_tier3_refusals_are_reported(encoder, tmp_path):
    from aios_fast.evolve.jobs import LearningRequest
    from aios_fast.evolve.node import SkillNode

    node = SkillNode(encoder=encoder, library_dir=tmp_path / "lib", start_worker=False)
    req = LearningRequest(topic_id="t-marrowby", queries=tuple(_queries()))
    out = _distiller(node, encoder.model.state_dict(), tier="hub").learn(req)
    assert out.entry is None and "runs on a Super node" in out.report["tiers"]["3"]["reason"]
    # a "stronger" model identical to the base: nothing to extract, reported, no card
    out = _distiller(node, {k: v.clone() for k, v in encoder.model.state_dict().items()}).learn(req)
    assert out.entry is None and not node.library.list()
    assert "extraction from the stronger model failed" in out.report["tiers"]["3"]["reason"]
