"""What the manager must keep apart or refuse: same-named scoped cards on two models in two
threads (scope by manager, not by name), cached factors made under ``inference_mode`` (must not
break a later forward with gradients), and layers a LoRA wrapper cannot serve (quantised
linears, ``nn.MultiheadAttention.out_proj``)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from aios_fast.errors import CardMismatchError
from aios_fast.lora import LoRALayer, LoRAManager
from aios_fast.lora.random import linear_shapes, random_card

TEXTS = ["how do I rotate the storage keys?"]
ATOL = 1e-5

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch(minilm_tokenizer):
    return minilm_tokenizer(TEXTS, padding=True, return_tensors="pt")


def _reference(model, card, batch, weight=1.0):
    """Output of ``model`` with ``card``'s delta written into a copy's weights."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for k in card.modules:
            ref.get_submodule(k).weight += weight * card.delta(k)
        return ref(**batch).last_hidden_state


def _run(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_same_named_scoped_cards_on_two_models_do_not_leak(hf_minilm, batch):
    """Issue 13.1: thread 2 holds card_b ("skill") on model B; thread 1 enters card_a ("skill")
    on model A and runs model B: B must be the plain base model in thread 1."""
    model_a, model_b = copy.deepcopy(hf_minilm), copy.deepcopy(hf_minilm)
    shapes = linear_shapes(model_a, r"attention\.self\.(query|value)$")
    card_a = random_card(shapes, name="skill", rank=4, seed=1, std=0.05)
    card_b = random_card(shapes, name="skill", rank=4, seed=2, std=0.05)
    base = _run(model_b, batch)
    want_a, want_b = _reference(model_a, card_a, batch), _reference(model_b, card_b, batch)
    # the cards really change the output (else the test could not fail)
    assert (want_a - base).abs().max() > 1e-2 and (want_b - base).abs().max() > 1e-2
    mgr_a, mgr_b = LoRAManager(model_a), LoRAManager(model_b)
    entered, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def thread2():
        try:
            with mgr_b.applied(card_b):
                entered.set()
                seen["t2_b"] = _run(model_b, batch)
                done.wait(timeout=60)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            entered.set()

    def thread1():
        try:
            entered.wait(timeout=60)
            with mgr_a.applied(card_a):
                seen["t1_b"] = _run(model_b, batch)
                seen["t1_a"] = _run(model_a, batch)
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=thread2), threading.Thread(target=thread1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    torch.testing.assert_close(seen["t1_b"], base, atol=ATOL, rtol=0)       # no card_b leak
    torch.testing.assert_close(seen["t1_a"], want_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(seen["t2_b"], want_b, atol=ATOL, rtol=0)
    assert not any(isinstance(m, LoRALayer) for m in (*model_a.modules(), *model_b.modules()))


def test_two_managers_on_one_model_keep_their_scopes(hf_minilm, batch):
    """Scope is per manager even on one shared model: a card entered on manager 1 is not
    applied by a context that entered manager 2's card of another name."""
    model = copy.deepcopy(hf_minilm)
    shapes = linear_shapes(model, r"attention\.self\.query$")
    c1 = random_card(shapes, name="one", rank=4, seed=3, std=0.05)
    c2 = random_card(shapes, name="two", rank=4, seed=4, std=0.05)
    m1, m2 = LoRAManager(model), LoRAManager(model)
    with m1.applied(c1):
        with m2.applied(c2):
            both = _run(model, batch)
        only1 = _run(model, batch)
    want1 = _reference(model, c1, batch)
    torch.testing.assert_close(only1, want1, atol=ATOL, rtol=0)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for c in (c1, c2):
            for k in c.modules:
                ref.get_submodule(k).weight += c.delta(k)
        want_both = ref(**batch).last_hidden_state
    torch.testing.assert_close(both, want_both, atol=ATOL, rtol=0)


def test_inference_mode_forward_then_grad_forward(hf_minilm, batch):
    """Issue 13.2: a global card, an ``inference_mode`` forward (what ``encode`` does), then a
    forward with gradients must backpropagate; so must a card whose tensors were created under
    inference mode."""
    model = copy.deepcopy(hf_minilm)
    shapes = linear_shapes(model, r"attention\.self\.(query|value)$")
    card = random_card(shapes, name="g", rank=4, seed=5, std=0.05)
    mgr = LoRAManager(model)
    mgr.apply_card(card, 0.5)
    with torch.inference_mode():
        model(**batch)
    out = model(**batch).last_hidden_state
    out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "query" in n and n.endswith("weight")]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    mgr.remove_card("g")
    model.zero_grad(set_to_none=True)

    with torch.inference_mode():
        made_inside = random_card(shapes, name="inside", rank=4, seed=6, std=0.05)
        assert next(iter(made_inside.weights_A.values())).is_inference()
        mgr.apply_card(made_inside)
        with mgr.applied(random_card(shapes, name="scoped", rank=4, seed=7, std=0.05)):
            model(**batch)
    out = model(**batch).last_hidden_state
    out.sum().backward()
    assert model.embeddings.word_embeddings.weight.grad is not None
    mgr.remove_card("inside")


class _Int8Params(nn.Parameter):
    """Stands in for bitsandbytes' ``Int8Params`` (bitsandbytes is not installed here)."""


class _Linear8bit(nn.Linear):
    """A bitsandbytes-style quantised linear: an ``nn.Linear`` subclass holding int8 weights."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__(lin.in_features, lin.out_features, bias=lin.bias is not None)
        q = (lin.weight.detach() * 127 / lin.weight.detach().abs().max()).round().to(torch.int8)
        self.weight = _Int8Params(q, requires_grad=False)


def test_quantised_linear_is_refused_with_the_reason(hf_minilm):
    model = copy.deepcopy(hf_minilm)
    card = random_card(linear_shapes(model, r"layer\.0\.attention\.self\.query$"), name="q", rank=4)
    attn = model.encoder.layer[0].attention.self
    attn.query = _Linear8bit(attn.query)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CardMismatchError, match=r"encoder\.layer\.0\.attention\.self\.query.*quantised"):
        LoRAManager(model).apply_card(card)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, LoRALayer) for m in model.modules())


def test_multihead_attention_out_proj_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ff = nn.Linear(16, 16)

    model = Block()
    shapes = linear_shapes(model)
    assert "attn.out_proj" not in shapes and "ff" in shapes  # not offered as adaptable
    from aios_fast.cards import LoRACard

    card = LoRACard("mha", 2, 4.0, ["attn.out_proj"], {"attn.out_proj": torch.randn(2, 16)},
                    {"attn.out_proj": torch.randn(16, 2)})
    with pytest.raises(CardMismatchError, match=r"attn\.out_proj.*MultiheadAttention.*bypassed"):
        LoRAManager(model).apply_card(card)
    assert isinstance(model.attn.out_proj, nn.Linear) and not isinstance(model.attn.out_proj, LoRALayer)


def test_one_selection_rule_for_trainer_probe_shapes_and_extractor(hf_minilm):
    """Issue 13.8: the same pattern selects the same modules in ``train`` (resolve_targets),
    ``probe`` (WeightMapProbe), ``linear_shapes`` and ``extract`` (include)."""
    from aios_fast.extract import LoRAExtractor
    from aios_fast.learn._inject import resolve_targets
    from aios_fast.probe import WeightMapProbe

    model = hf_minilm
    from aios_fast.extract.sources import DictSource

    base = DictSource({k: v for k, v in model.state_dict().items() if "embeddings" not in k})

    class _Engine:  # what WeightMapProbe needs: .model and .tokenize
        def __init__(self, m):
            self.model = m

        def tokenize(self, texts):
            raise AssertionError("not called")

    ex = LoRAExtractor(rank=1)
    patterns = [r"layer\.[01]\.attention\.self\.(query|value)", ["query", "1.output.dense"],
                ["encoder.layer.5.intermediate.dense"], r"intermediate"]
    for pattern in patterns:
        train = resolve_targets(model, pattern)
        probe = sorted(WeightMapProbe(_Engine(model), modules=pattern).module_names)
        shapes = sorted(linear_shapes(model, pattern))
        extract = sorted(ex.select_modules(base, base, pattern, None))
        assert train == probe == shapes == extract, pattern
        assert train  # selects something
    # a suffix matches whole name parts only, and a list entry that selects nothing is an error
    assert "encoder.layer.0.attention.self.query" in resolve_targets(model, ["query"])
    with pytest.raises(CardMismatchError, match=r"\['uery'\] match no"):
        resolve_targets(model, ["query", "uery"])

