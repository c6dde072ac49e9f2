"""SkillFactory.model_rotation on a real pair: the bundled MiniLM and a copy fine-tuned in the
test on one domain (a LoRA trained on the Ferrowind QA set, merged into the weights and saved
as a sentence-transformers directory). The changed modules are published as a card, with the
comparison in its metadata; an identical copy publishes nothing; a repeated release whose
modules did not move (subspace similarity ~ 1) publishes nothing either."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from _factory_data import FERROWIND, records

pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = {"storage": ["How do I take a brindle?", "What is the moss queue?", "How do I open the lantern?",
                     "Which node is the heron?", "How big should the ember be?", "Where is the wicker?"]}


@pytest.fixture(scope="module")
def releases(tmp_path_factory, minilm_dir):
    """(previous release dir, new release dir fine-tuned on one domain, identical copy dir, trained keys)."""
    from safetensors.torch import save_file

    from aios_fast.engines import SentenceEncoder
    from aios_fast.learn import LoRATrainer

    root = tmp_path_factory.mktemp("releases")
    enc = SentenceEncoder(minilm_dir)
    pairs = [(r["query"], r["answer"]) for r in records(FERROWIND)]
    card, _ = LoRATrainer(enc).train(pairs, rank=4, alpha=8, epochs=1, lr=3e-3, batch_size=16, seed=0,
                                     progress=False)
    new_dir, same_dir = root / "new", root / "same"
    shutil.copytree(minilm_dir, new_dir)
    shutil.copytree(minilm_dir, same_dir)
    sd = {k: v.detach().clone().contiguous() for k, v in enc.model.state_dict().items()}
    for key in card.modules:                                  # fine-tune = merge the trained delta
        sd[key + ".weight"] += card.delta(key)
    save_file(sd, str(new_dir / "model.safetensors"), metadata={"format": "pt"})
    return minilm_dir, new_dir, same_dir, set(card.modules)


@pytest.fixture
def factory(tmp_path):
    from aios_fast.engines import SentenceEncoder
    from aios_fast.factory import SkillFactory

    published = []
    fac = SkillFactory(SentenceEncoder(), tmp_path, executor="inline", publish=published.append)
    fac.published = published
    return fac


@pytest.mark.slow
def test_rotation_publishes_changed_modules_only(factory, releases):
    prev_dir, new_dir, same_dir, trained = releases
    rep = factory.model_rotation(str(new_dir), str(prev_dir), BENCH)
    assert rep.new_fingerprint != rep.previous_fingerprint
    (key,) = rep.published
    assert [e.key for e in factory.published] == [key]
    card = factory.library.load_card(key.split("@")[0])
    assert set(card.modules) == trained                       # exactly the modules that changed
    assert card.base_fingerprint == rep.previous_fingerprint
    meta = json.loads(card.metadata["rotation"])
    assert set(meta) == trained and all(m["similarity"] is None and m["rel_change"] > 1e-4 for m in meta.values())
    # the card reproduces the fine-tune up to the energy budget: applied to the previous release
    # it gives the new weights, the residual being exactly the energy it left out
    from aios_fast.engines import SentenceEncoder

    rows = {r.module: r for r in rep.modules}
    new = SentenceEncoder(new_dir).model.state_dict()
    old = SentenceEncoder(prev_dir).model.state_dict()
    for k in card.modules:
        want = new[k + ".weight"] - old[k + ".weight"]
        resid = float(torch.linalg.vector_norm(card.delta(k) - want) ** 2 / torch.linalg.vector_norm(want) ** 2)
        assert resid == pytest.approx(1 - rows[k].energy, abs=1e-3) and rows[k].energy >= 0.9
    assert len(rows) >= 36 and all(rows[k].published for k in trained)  # every linear weight reported
    assert all(rows[k].status == "unchanged" and not rows[k].published for k in rows if k not in trained)
    assert all(0 < rows[k].energy <= 1 and rows[k].rank >= 1 for k in trained)
    assert (factory.workspace / "models").is_dir()             # the new release was converted

    # the same release again: every module matches the previous card -> nothing published
    again = factory.model_rotation(str(new_dir), str(prev_dir), BENCH)
    assert again.published == [] and len(factory.published) == 1
    assert all(r.similarity > 0.99 and "same as previous" in r.status
               for r in again.modules if r.module in trained)

    # an identical copy: nothing changed, nothing published
    same = factory.model_rotation(str(same_dir), str(prev_dir), BENCH)
    assert same.published == [] and all(r.status == "unchanged" for r in same.modules)
    assert len(factory.published) == 1


def test_subspace_similarity_from_factors():
    from aios_fast.factory.subspace import combine_factors, delta_cosine, delta_norm, subspace_similarity

    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g)
    R = torch.linalg.qr(torch.randn(4, 4, generator=g))[0]
    # the same update written with other factors: same subspaces
    s = subspace_similarity(B @ R, R.T @ A, B, A)
    assert s["similarity"] == pytest.approx(1.0, abs=1e-9) and s["min_angle_deg"] < 1e-3
    B2, A2 = torch.randn(64, 4, generator=g), torch.randn(4, 48, generator=g)
    assert subspace_similarity(B, A, B2, A2)["similarity"] < 0.3
    assert delta_norm(B, A, 2.0) == pytest.approx(float(torch.linalg.matrix_norm(2.0 * B.double() @ A.double())), rel=1e-9)
    assert delta_cosine(B, A, 1.0, B, A, 3.0) == pytest.approx(1.0)
    # combining two updates: the rank-8 fold is exact, the rank-4 one is the best rank-4 (SVD)
    full = B @ A + 0.5 * B2 @ A2
    Bc, Ac, kept = combine_factors([(1.0, B, A), (0.5, B2, A2)], rank=8, alpha=16.0)
    assert kept == pytest.approx(1.0) and torch.allclose(2.0 * Bc @ Ac, full, atol=1e-3)
    Bc, Ac, kept = combine_factors([(1.0, B, A), (0.5, B2, A2)], rank=4, alpha=4.0)
    S = torch.linalg.svdvals(full.double())
    assert kept == pytest.approx(float((S[:4] ** 2).sum() / (S ** 2).sum()), rel=1e-5)
