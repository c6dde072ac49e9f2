"""LoRAManager on the real bundled all-MiniLM-L6-v2: exact deltas, PEFT parity, several cards,
remove/merge/unmerge restoring the base, naming schemes, wrapper prefixes, refusals that leave
the model untouched, fingerprints, and cards loaded from files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from aios_fast.errors import CardMismatchError, InputError
from aios_fast.lora import LoRALayer, LoRAManager
from aios_fast.lora.random import linear_shapes, random_card

ATOL = 1e-5
TEXTS = ["The cat sat on the mat.", "Skill cards carry low-rank deltas between nodes."]


@pytest.fixture
def model(hf_minilm):
    return copy.deepcopy(hf_minilm)


@pytest.fixture(scope="module")
def batch(minilm_tokenizer):
    return minilm_tokenizer(TEXTS, padding=True, return_tensors="pt")


@pytest.fixture(scope="module")
def shapes(hf_minilm):
    s = linear_shapes(hf_minilm)
    assert len(s) == 37 and "encoder.layer.0.attention.self.query" in s  # 6 layers × 6 + pooler
    return s


def run(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def manual(base_model, cards_weights) -> nn.Module:
    """A copy of ``base_model`` with W + Σ weight·scaling·B@A written into the weights."""
    ref = copy.deepcopy(base_model)
    with torch.no_grad():
        for card, w in cards_weights:
            for key in card.modules:
                ref.get_submodule(key).weight += w * card.delta(key)
    return ref


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def wrapped(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALayer)]


# --------------------------------------------------------------------------- exact deltas
def test_rank8_card_changes_output_by_BA(model, hf_minilm, batch, shapes):
    card = random_card(shapes, name="r8", rank=8, alpha=16, seed=1)
    assert all(card.module_rank(k) == 8 and bool((card.weights_B[k] != 0).all()) for k in shapes)
    base = run(model, batch)
    mgr = LoRAManager(model)
    mgr.apply_card(card, weight=0.8)
    out = run(model, batch)
    expected = run(manual(hf_minilm, [(card, 0.8)]), batch)
    assert (out - base).abs().max() > 1e-2
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    assert mgr.list_cards() == ["r8"] and len(wrapped(model)) == 37


def test_several_cards_with_weights(model, hf_minilm, batch, shapes):
    c1 = random_card(shapes, name="one", rank=8, seed=1)
    attn = {k: v for k, v in shapes.items() if ".attention." in k}
    c2 = random_card(attn, name="two", rank=4, alpha=4, seed=2)
    c3 = random_card({k: v for k, v in shapes.items() if "intermediate" in k}, name="three", seed=3)
    mgr = LoRAManager(model)
    mgr.apply_card(c1, 0.5)
    mgr.apply_card(c2, -1.25)
    mgr.apply_card(c3, 2.0)
    assert mgr.list_cards() == ["one", "two", "three"]
    expected = run(manual(hf_minilm, [(c1, 0.5), (c2, -1.25), (c3, 2.0)]), batch)
    torch.testing.assert_close(run(model, batch), expected, atol=ATOL, rtol=0)


def test_remove_one_leaves_others_exactly(model, hf_minilm, batch, shapes):
    c1 = random_card(shapes, name="keep", rank=8, seed=1)
    c2 = random_card(shapes, name="drop", rank=8, seed=2)
    only = copy.deepcopy(hf_minilm)
    LoRAManager(only).apply_card(c1, 0.5)
    expected = run(only, batch)
    mgr = LoRAManager(model)
    mgr.apply_card(c1, 0.5)
    q = model.encoder.layer[0].attention.self.query
    kept = q.adapters["keep"]
    mgr.apply_card(c2, 1.0)
    assert not torch.equal(run(model, batch), expected)
    mgr.remove_card("drop")
    assert mgr.list_cards() == ["keep"]
    assert q.adapters["keep"] is kept  # the remaining adapter object is untouched
    assert torch.equal(run(model, batch), expected)  # bit for bit


def test_remove_all_restores_base_and_modules(model, batch, shapes):
    originals = {k: model.get_submodule(k) for k in shapes}
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    base = run(model, batch)
    mgr = LoRAManager(model)
    mgr.apply_card(random_card(shapes, name="a", seed=1))
    mgr.apply_card(random_card(shapes, name="b", seed=2), 0.3)
    mgr.merge("a")
    mgr.remove_card("a")
    mgr.remove_card("b")
    assert mgr.list_cards() == [] and wrapped(model) == []
    assert all(model.get_submodule(k) is m for k, m in originals.items())  # same objects
    assert state_equal(model.state_dict(), sd)
    assert torch.equal(run(model, batch), base)
    with pytest.raises(InputError, match="no card named 'a'"):
        mgr.remove_card("a")


@pytest.mark.parametrize("exact", [pytest.param(True, id="exact-copy"), pytest.param(False, id="subtract")])
def test_merge_equals_unmerged_and_unmerge_restores(hf_minilm, batch, shapes, exact):
    model = copy.deepcopy(hf_minilm)
    base_w = {k: model.get_submodule(k).weight.detach().clone() for k in shapes}
    mgr = LoRAManager(model, exact_unmerge=exact)
    mgr.apply_card(random_card(shapes, name="m1", seed=1), 0.7)
    mgr.apply_card(random_card(shapes, name="m2", seed=2), -0.4)
    unmerged = run(model, batch)
    mgr.merge()
    assert mgr.merged_cards() == ["m1", "m2"]
    w = {k: model.get_submodule(k).weight for k in shapes}
    assert max((w[k] - base_w[k]).abs().max().item() for k in shapes) > 1e-3
    torch.testing.assert_close(run(model, batch), unmerged, atol=ATOL, rtol=0)
    mgr.unmerge("m1")
    torch.testing.assert_close(run(model, batch), unmerged, atol=ATOL, rtol=0)
    mgr.unmerge()
    assert mgr.merged_cards() == []
    diff = max((model.get_submodule(k).weight - base_w[k]).abs().max().item() for k in shapes)
    assert diff <= 1e-6
    if exact:
        assert diff == 0.0
    torch.testing.assert_close(run(model, batch), unmerged, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- names
def test_arrowengine_named_card(model, hf_minilm, batch, shapes):
    encoder_only = {k: v for k, v in shapes.items() if k.startswith("encoder.")}
    card = random_card(encoder_only, name="hf", seed=4)
    ae = card.with_naming("arrowengine")
    assert ae.naming == "arrowengine" and "encoder_layers.0.attention.query" in ae.modules
    expected = run(manual(hf_minilm, [(card, 1.0)]), batch)
    mgr = LoRAManager(model)
    mgr.apply_card(ae)
    torch.testing.assert_close(run(model, batch), expected, atol=ATOL, rtol=0)
    assert mgr.list_cards() == ["hf"]


def test_card_with_wrapper_prefix_applies_to_bare_model(model, hf_minilm, batch, shapes):
    from aios_fast.cards import LoRACard

    card = random_card(shapes, name="plain", seed=5)
    pre = "0.auto_model."
    prefixed = LoRACard(name="prefixed", rank=card.rank, alpha=card.alpha,
                        target_modules=[pre + k for k in card.modules],
                        weights_A={pre + k: v for k, v in card.weights_A.items()},
                        weights_B={pre + k: v for k, v in card.weights_B.items()})
    expected = run(manual(hf_minilm, [(card, 1.0)]), batch)
    LoRAManager(model).apply_card(prefixed)
    torch.testing.assert_close(run(model, batch), expected, atol=ATOL, rtol=0)


def test_bare_card_applies_to_sentence_transformer(minilm_dir, shapes):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir), device="cpu")
    # sentence-transformers wraps the BertModel ("0.auto_model." or, in v5, "0.model.")
    (query,) = [n for n, _ in st.named_modules() if n.endswith(".encoder.layer.0.attention.self.query")]
    assert query.startswith("0.")
    base = st.encode(TEXTS, convert_to_tensor=True)
    mgr = LoRAManager(st)
    card = random_card(shapes, name="st", seed=6)
    mgr.apply_card(card)
    assert isinstance(st.get_submodule(query), LoRALayer)
    changed = st.encode(TEXTS, convert_to_tensor=True)
    assert (changed - base).abs().max() > 1e-3
    mgr.remove_card("st")
    torch.testing.assert_close(st.encode(TEXTS, convert_to_tensor=True), base, atol=0, rtol=0)


def test_sentence_encoder_engine(hf_minilm, shapes):
    from aios_fast.engines import SentenceEncoder

    enc = SentenceEncoder()
    card = random_card(shapes, name="enc", seed=7)
    base = enc.encode(TEXTS)
    ref = SentenceEncoder()
    with torch.no_grad():
        for k in card.modules:
            ref.model.get_submodule(k).weight += 0.5 * card.delta(k)
    expected = ref.encode(TEXTS)
    mgr = LoRAManager(enc.model)
    mgr.apply_card(card, 0.5)
    out = enc.encode(TEXTS)
    assert (out - base).abs().max() > 1e-3
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    with mgr.applied(random_card(shapes, name="scoped", seed=8)):
        assert not torch.allclose(enc.encode(TEXTS), out, atol=1e-4)
    torch.testing.assert_close(enc.encode(TEXTS), out, atol=0, rtol=0)


# --------------------------------------------------------------------------- refusals
def _bad_cards(shapes):
    from aios_fast.cards import LoRACard

    good = random_card(shapes, name="good", seed=9)
    A, B = dict(good.weights_A), dict(good.weights_B)
    # a key that exists nowhere, sorted last so that every other key validates first
    nowhere = dict(A, **{"zzz.not_a_module": torch.zeros(8, 384)}), dict(B, **{"zzz.not_a_module": torch.zeros(384, 8)})
    wrong_in = dict(A, **{"pooler.dense": torch.ones(8, 383)}), B
    wrong_out = A, dict(B, **{"pooler.dense": torch.ones(385, 8)})
    ambiguous = ({"query": torch.ones(8, 384)}, {"query": torch.ones(384, 8)})
    out = {}
    for label, (a, b) in {"no-module": nowhere, "wrong-in": wrong_in, "wrong-out": wrong_out,
                          "ambiguous": ambiguous}.items():
        out[label] = LoRACard(name=label, rank=8, alpha=16, target_modules=list(a), weights_A=a, weights_B=b)
    return out


@pytest.mark.parametrize("label", ["no-module", "wrong-in", "wrong-out", "ambiguous"])
def test_mismatched_card_raises_and_leaves_model_untouched(model, batch, shapes, label):
    mgr = LoRAManager(model)
    mgr.apply_card(random_card(shapes, name="present", seed=10), 0.5)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    modules = dict(model.named_modules())
    out = run(model, batch)
    with pytest.raises(CardMismatchError, match=label.split("-")[0] if label == "ambiguous" else "module"):
        mgr.apply_card(_bad_cards(shapes)[label])
    assert state_equal(model.state_dict(), sd)
    assert dict(model.named_modules()) == modules
    assert all("present" in m.adapters and len(m.adapters) == 1
               for m in model.modules() if isinstance(m, LoRALayer))
    assert mgr.list_cards() == ["present"]
    assert torch.equal(run(model, batch), out)


def test_card_for_no_module_of_a_fresh_model(model, shapes):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    card = random_card({"decoder.layers.0.mlp.up_proj": (384, 1536)}, name="llama")
    with pytest.raises(CardMismatchError, match="matches no adaptable module"):
        LoRAManager(model).apply_card(card)
    assert wrapped(model) == [] and state_equal(model.state_dict(), sd)


def test_applying_the_same_name_twice_is_refused(model, shapes):
    mgr = LoRAManager(model)
    mgr.apply_card(random_card(shapes, name="dup", seed=1))
    with pytest.raises(InputError, match="already applied"):
        mgr.apply_card(random_card(shapes, name="dup", seed=2))


def test_fingerprint_checked(model, batch, shapes):
    from aios_fast.cards import fingerprint_model

    fp = fingerprint_model(model)
    ok = random_card(shapes, name="fp-ok", base_fingerprint=fp)
    mgr = LoRAManager(model)
    assert mgr.fingerprint() == fp
    mgr.apply_card(ok)
    assert mgr.fingerprint() == fp  # unchanged by the applied card
    other = random_card(shapes, name="fp-other", base_fingerprint="0" * len(fp))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CardMismatchError, match="fingerprint"):
        mgr.apply_card(other)
    assert state_equal(model.state_dict(), sd)
    mgr.apply_card(other, check_fingerprint=False)
    assert mgr.list_cards() == ["fp-ok", "fp-other"]


# --------------------------------------------------------------------------- files
def test_load_card_then_apply_by_name(model, hf_minilm, batch, shapes, tmp_path):
    from aios_fast.cards import LoRAFormat

    card = random_card(shapes, name="from-file", seed=11)
    path = LoRAFormat.save(card, tmp_path / "skill.lora.arrow")
    mgr = LoRAManager(model)
    loaded = mgr.load_card(path)
    assert loaded.name == "from-file" and mgr.list_cards() == []
    mgr.apply_card("from-file", 0.5)
    expected = run(manual(hf_minilm, [(card, 0.5)]), batch)
    torch.testing.assert_close(run(model, batch), expected, atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="no card named 'nope' was loaded"):
        mgr.apply_card("nope")


# --------------------------------------------------------------------------- PEFT parity
def test_same_outputs_as_peft(model, hf_minilm, batch, shapes, tmp_path):
    from peft import PeftModel

    from aios_fast.interop.peft import to_peft

    attn = {k: v for k, v in shapes.items() if k.startswith("encoder.")}
    card = random_card(attn, name="parity", rank=8, alpha=32, seed=12)
    to_peft(card, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_minilm), tmp_path / "adapter").eval()
    theirs = run(peft_model, batch)
    LoRAManager(model).apply_card(card)
    ours = run(model, batch)
    assert (ours - run(hf_minilm, batch)).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_bfloat16_minilm_follows_dtype(model, hf_minilm, batch, shapes):
    card = random_card(shapes, name="bf", seed=13)
    expected = run(manual(hf_minilm, [(card, 1.0)]), batch)
    mgr = LoRAManager(model)
    mgr.apply_card(card)
    model.to(torch.bfloat16)
    q = model.encoder.layer[0].attention.self.query
    assert q.adapters["bf"].A.dtype == torch.bfloat16 and q.base_layer.weight.dtype == torch.bfloat16
    out = run(model, batch).float()
    assert (out - expected).abs().mean() < 5e-2
