"""Arrow routing: prototypes from the r×r core equal the SVD of the formed ΔW; query scores
equal |ĥ·v| computed from the model's own hidden states; example-less cards get routed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aios_fast import LoRACard, LoRARouter
from aios_fast.lora.random import random_card
from aios_fast.route.arrow import ArrowIndex, card_prototypes, encode_with_hidden, top_right_singular_vector


@pytest.mark.parametrize("out_f, in_f, r", [(384, 384, 8), (1536, 384, 4), (384, 1536, 16), (6, 300, 12)],
                         ids=["square", "tall", "wide", "rank-over-out"])
def test_prototype_matches_svd_of_formed_delta(out_f, in_f, r):
    g = torch.Generator().manual_seed(out_f + in_f + r)
    A = torch.randn(r, in_f, generator=g)
    B = torch.randn(out_f, r, generator=g)
    v = top_right_singular_vector(A, B)
    _, S, Vh = torch.linalg.svd((B.double() @ A.double()), full_matrices=False)
    assert S[0] > S[1] * 1.001                  # a well-defined top direction
    assert v.shape == (in_f,) and v.dtype == torch.float32
    assert abs(float(v.double() @ Vh[0])) == pytest.approx(1.0, abs=1e-6)


def test_card_prototypes_use_hf_keys():
    c = random_card({"encoder_layers.0.attention.query": (32, 32)}, rank=2, naming="arrowengine")
    protos = card_prototypes(c)
    assert list(protos) == ["encoder.layer.0.attention.self.query"]
    assert float(protos["encoder.layer.0.attention.self.query"].norm()) == pytest.approx(1.0, abs=1e-6)


def test_scores_equal_hidden_state_reference(encoder):
    keys = ["encoder.layer.0.attention.self.query", "encoder.layer.3.output.dense"]
    shapes = {keys[0]: (384, 384), keys[1]: (1536, 384)}
    cards = [random_card(shapes, name=f"c{i}", rank=4, seed=i) for i in range(3)]
    index = ArrowIndex({c.name: card_prototypes(c) for c in cards})
    texts = ["How do I boil an egg?", "my car will not start in the cold"]
    emb, hidden = encode_with_hidden(encoder, texts, index.modules)
    torch.testing.assert_close(emb, encoder.encode(texts), atol=1e-5, rtol=1e-5)
    got = index.score(hidden)
    # reference: the model's own hidden states (layer 0 query reads hidden_states[0]; layer 3's
    # output.dense reads the intermediate activation, captured with a plain forward hook)
    batch = encoder.tokenize(texts)
    inter = {}
    h = encoder.model.encoder.layer[3].intermediate.register_forward_hook(lambda m, a, o: inter.setdefault("x", o))
    with torch.no_grad():
        hs = encoder.model(**batch, output_hidden_states=True).hidden_states
    h.remove()
    mask = batch["attention_mask"].float()
    states = {keys[0]: hs[0], keys[1]: inter["x"]}
    ref = torch.zeros(2, 3)
    for j, c in enumerate(cards):
        per_layer = []
        for k in keys:
            v = top_right_singular_vector(c.weights_A[k], c.weights_B[k])
            cos = (F.normalize(states[k], dim=-1) @ v).abs()
            per_layer.append((cos * mask).sum(1) / mask.sum(1))
        ref[:, j] = torch.stack(per_layer).mean(0)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


def _aligned_card(encoder, name, texts, key="encoder.layer.2.attention.self.query"):
    """A rank-1 card whose input direction is the mean token state of ``texts`` at ``key``
    (what a skill trained on those texts tends to amplify)."""
    _, hidden = encode_with_hidden(encoder, texts, [key])
    H, mask = hidden[key]
    Hn = F.normalize(H, dim=-1) * mask.unsqueeze(-1)
    mean = Hn.sum((0, 1)) / mask.sum()
    A = F.normalize(mean, dim=0).unsqueeze(0)
    B = torch.randn(384, 1, generator=torch.Generator().manual_seed(0)) * 0.01
    return LoRACard(name=name, rank=1, alpha=1.0, target_modules=[key], weights_A={key: A},
                    weights_B={key: B})


def test_router_routes_example_less_cards_by_weights(encoder):
    cooking = ["How do I boil an egg?", "What temperature to roast chicken?", "pasta sauce recipe",
               "how to bake bread", "caramelize onions in a pan"]
    cars = ["my car battery is dead", "brake pads squeal", "change the engine oil",
            "check engine light is on", "tyre pressure for my car"]
    r = LoRARouter(encoder)
    r.register_card(_aligned_card(encoder, "cook", cooking))
    r.register_card(_aligned_card(encoder, "auto", cars))
    assert r.status()["arrow_skills"] == 2
    assert r.route("how long do I cook the pasta").top == "cook"
    assert r.route("the engine makes a rattling noise").top == "auto"
