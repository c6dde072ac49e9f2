"""LoRATrainer on a GPT-2 (transformers Conv1D, weight stored (in, out)): the card it exports is
the card the same training gives on the model's nn.Linear twin, it lowers the answers' NLL when the
manager serves it, and PiSSA's residual goes back into the layer in its own layout. The model is a
real transformers GPT2LMHeadModel with random weights (no GPT-2 checkpoint is bundled) and the
bundled MiniLM's WordPiece tokenizer."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from aios_fast.errors import CardMismatchError
from aios_fast.learn import LoRATrainer
from aios_fast.learn._engine import EngineView
from aios_fast.learn._inject import LoRALinear, init_factors, injected, resolve_targets
from aios_fast.lora import LoRAManager

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [(f"What colour is crate {n}?", f"Crate {n} is {c}.") for n, c in
         zip(("alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike", "oscar", "papa"),
             ("red", "blue", "green", "amber", "red", "blue", "green", "amber", "red", "blue", "green", "amber"))]


@pytest.fixture(scope="module")
def gpt2_engine(minilm_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    tok = minilm_tokenizer
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=tok.vocab_size,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    # a chat prompt of our own: the WordPiece tokenizer has no chat template
    return SimpleNamespace(model=model, tokenizer=minilm_tokenizer,
                           chat_prompt=lambda msgs: f"question : {msgs[0]['content']} answer :")


TARGETS = ["c_attn", "c_proj", "c_fc"]
TRAIN = dict(objective="sft", rank=8, alpha=16, epochs=8, lr=2e-2, batch_size=4, seed=0, target_modules=TARGETS)


def _linear_twin(engine):
    """The same network with every Conv1D replaced by the nn.Linear computing the same map."""
    from transformers.pytorch_utils import Conv1D

    twin = copy.deepcopy(engine.model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, Conv1D):
            lin = nn.Linear(*mod.weight.shape)
            with torch.no_grad():
                lin.weight.copy_(mod.weight.T)
                lin.bias.copy_(mod.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(twin.get_submodule(parent), leaf, lin)
    return SimpleNamespace(model=twin, tokenizer=engine.tokenizer, chat_prompt=engine.chat_prompt)


def _answer_nll(engine, pairs) -> float:
    view = EngineView(engine)
    with torch.no_grad():
        nll, n = view.token_nll(view.sft_batch(pairs))
    return float(nll / n)


def test_default_targets_are_gpt2_c_attn(gpt2_engine):
    from transformers.pytorch_utils import Conv1D

    keys = resolve_targets(gpt2_engine.model, None)
    assert keys == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    assert all(isinstance(gpt2_engine.model.get_submodule(k), Conv1D) for k in keys)
    assert resolve_targets(gpt2_engine.model, ["c_proj"]) == [
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"]
    with pytest.raises(CardMismatchError, match="match no nn.Linear or Conv1D"):
        resolve_targets(gpt2_engine.model, ["wte"])  # an embedding is not an adaptable layer


def test_sft_card_on_conv1d_lowers_answer_nll_through_the_manager(gpt2_engine):
    model = gpt2_engine.model
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    before = _answer_nll(gpt2_engine, PAIRS)
    card, rep = LoRATrainer(gpt2_engine).train(PAIRS, **TRAIN)
    assert rep.objective == "sft" and rep.steps == 24 and len(card.modules) == 8
    # PEFT's orientation whatever the storage: A (r, in), B (out, r); c_attn maps 64 -> 3 * 64
    k = "transformer.h.0.attn.c_attn"
    assert card.weights_A[k].shape == (8, 64) and card.weights_B[k].shape == (192, 8)
    # training left the base model as it was
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.items())
    mgr = LoRAManager(model)
    with mgr.applied(card):
        after = _answer_nll(gpt2_engine, PAIRS)
    print(f"\nanswer NLL {before:.3f} -> {after:.3f} nats/token (random GPT-2, rank 8)")
    assert before - after >= 0.6, (before, after)  # measured 10.45 -> 9.44 (seed 0), 9.48 (seed 1)
    assert _answer_nll(gpt2_engine, PAIRS) == pytest.approx(before, abs=1e-6)


def test_pissa_residual_keeps_the_conv1d_function_at_step_zero(gpt2_engine):
    model = gpt2_engine.model
    keys = resolve_targets(model, ["c_attn", "c_fc"])
    A, B, residual = init_factors(model, keys, rank=4, scaling=2.0, init="pissa",
                                  generator=torch.Generator().manual_seed(0))
    for k in keys:
        w = model.get_submodule(k).weight  # (in, out)
        assert residual[k].shape == w.shape
        # the principal part is in (out, in): added back transposed, it rebuilds the stored weight
        torch.testing.assert_close(residual[k] + 2.0 * (B[k] @ A[k]).T, w.detach(), atol=1e-5, rtol=0)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
        with injected(model, A, B, 2.0, residual=residual, train=False):
            at_init = model(ids).logits
        assert torch.equal(model(ids).logits, base)
    torch.testing.assert_close(at_init, base, atol=1e-4, rtol=0)


def test_conv1d_card_equals_the_linear_twins_card(gpt2_engine):
    twin = _linear_twin(gpt2_engine)
    assert _answer_nll(twin, PAIRS) == pytest.approx(_answer_nll(gpt2_engine, PAIRS), abs=1e-5)
    card, _ = LoRATrainer(gpt2_engine).train(PAIRS, **TRAIN)
    ref, _ = LoRATrainer(twin).train(PAIRS, **TRAIN)
    assert sorted(card.modules) == sorted(ref.modules)
    for k in card.modules:
        d, r = card.delta(k), ref.delta(k)
        assert float(r.norm()) > 1e-3
        assert float((d - r).norm() / r.norm()) < 1e-3, k
