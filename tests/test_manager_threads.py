"""Scoped applications (``with mgr.applied(card):``) from several threads on one shared MiniLM:
each request sees only its own card (plus the globally applied ones), and the model is left
exactly as it was afterwards."""

from __future__ import annotations

import copy
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from aios_fast.errors import InputError
from aios_fast.lora import LoRALayer, LoRAManager
from aios_fast.lora.random import linear_shapes, random_card

ATOL = 1e-5
TEXTS = ["a request about cooking", "another request, about astronomy"]


@pytest.fixture(scope="module")
def setup(hf_minilm, minilm_tokenizer):
    model = copy.deepcopy(hf_minilm)
    batch = minilm_tokenizer(TEXTS, padding=True, return_tensors="pt")
    shapes = linear_shapes(model)
    attn = {k: v for k, v in shapes.items() if ".attention." in k}
    cards = [random_card(shapes, name="cook", rank=8, seed=21),
             random_card(attn, name="astro", rank=4, alpha=8, seed=22),
             random_card(shapes, name="law", rank=16, alpha=16, seed=23)]
    weights = {"cook": 1.0, "astro": -0.5, "law": 0.75}
    with torch.no_grad():
        expected = {None: model(**batch).last_hidden_state}
        for card in cards:  # reference: the card's delta written into a copy's weights
            ref = copy.deepcopy(hf_minilm)
            for k in card.modules:
                ref.get_submodule(k).weight += weights[card.name] * card.delta(k)
            expected[card.name] = ref(**batch).last_hidden_state
    return model, batch, cards, weights, expected


def _serve(mgr, model, batch, card, weight):
    with torch.no_grad():
        if card is None:
            return model(**batch).last_hidden_state
        with mgr.applied(card, weight):
            return model(**batch).last_hidden_state


def test_concurrent_scoped_cards_each_get_their_own_result(setup):
    model, batch, cards, weights, expected = setup
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = LoRAManager(model)
    rng = random.Random(0)
    plan = [rng.choice([None, *cards]) for _ in range(96)]
    barrier = threading.Barrier(6)

    def job(card):
        try:
            barrier.wait(timeout=0.5)  # start the first requests together
        except threading.BrokenBarrierError:
            pass
        return _serve(mgr, model, batch, card, weights[card.name] if card else 1.0)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(job, plan))
    for card, out in zip(plan, results):
        key = card.name if card else None
        torch.testing.assert_close(out, expected[key], atol=ATOL, rtol=0,
                                   msg=lambda m, key=key: f"request for {key}: {m}")
    # all scoped registrations gone: original modules, original weights
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert mgr.list_cards() == []
    after = model.state_dict()
    assert after.keys() == sd.keys() and all(torch.equal(after[k], v) for k, v in sd.items())


def test_scoped_card_while_another_thread_holds_it(setup):
    """Refcounting: one thread's exit does not unregister a card another thread still uses."""
    model, batch, cards, weights, expected = setup
    mgr = LoRAManager(model)
    cook = cards[0]
    inside, release = threading.Event(), threading.Event()

    def holder():
        with mgr.applied(cook, weights["cook"]):
            inside.set()
            release.wait(timeout=30)
            with torch.no_grad():
                return model(**batch).last_hidden_state

    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(holder)
        assert inside.wait(timeout=30)
        # this thread enters and leaves the same card while the holder is inside
        out = _serve(mgr, model, batch, cook, weights["cook"])
        torch.testing.assert_close(out, expected["cook"], atol=ATOL, rtol=0)
        # outside any scope this thread sees the base model although the card is registered
        assert isinstance(model.encoder.layer[0].attention.self.query, LoRALayer)
        torch.testing.assert_close(_serve(mgr, model, batch, None, 1.0), expected[None], atol=0, rtol=0)
        release.set()
        torch.testing.assert_close(fut.result(), expected["cook"], atol=ATOL, rtol=0)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_scoped_adds_to_global_and_nests(setup, hf_minilm):
    model, batch, cards, weights, expected = setup
    cook, astro, _ = cards
    mgr = LoRAManager(model)
    mgr.apply_card(cook, weights["cook"])
    ref = copy.deepcopy(hf_minilm)
    with torch.no_grad():
        for card in (cook, astro):
            for k in card.modules:
                ref.get_submodule(k).weight += weights[card.name] * card.delta(k)
        both = ref(**batch).last_hidden_state
    with mgr.applied(astro, weights["astro"]):
        torch.testing.assert_close(_serve(mgr, model, batch, None, 1.0), both, atol=ATOL, rtol=0)
        with pytest.raises(InputError, match="already applied in this scope"):
            with mgr.applied(astro):
                pass
    torch.testing.assert_close(_serve(mgr, model, batch, None, 1.0), expected["cook"], atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="applied globally"):
        with mgr.applied(cook):
            pass
    mgr.remove_card("cook")
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
