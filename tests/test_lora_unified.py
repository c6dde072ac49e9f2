"""One LoRA wrapper for training and serving (issue 13.15): the trainer's adapters are
``LoRALayer`` adapters, so a trained card served by ``LoRAManager`` runs the very same code as
the training-time module, a served card can sit on a layer that is being trained, and the
refusal and scope rules are the manager's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from aios_fast.errors import CardMismatchError, InputError
from aios_fast.learn import LoRATrainer
from aios_fast.learn._inject import TRAIN_ADAPTER, injected
from aios_fast.lora import LoRALayer, LoRAManager, base_only, random_card
from aios_fast.lora.layer import geometry_of

DATA = Path(__file__).parent / "data" / "qa"
PROBE = ["How do I take a brindle?", "The capital of France is Paris.", "Rotate the key every ninety days."]

pytestmark = pytest.mark.usefixtures("one_thread")


def _embed(enc):
    with torch.no_grad():
        return enc.embed(enc.tokenize(PROBE)).clone()


def test_trained_card_served_by_manager_is_the_training_time_module():
    from aios_fast.engines import SentenceEncoder

    enc = SentenceEncoder()
    train = [json.loads(l) for l in (DATA / "ferrowind_train.jsonl").read_text().splitlines() if l.strip()][:16]
    base = _embed(enc)
    seen = {}

    def at_end_of_training(model):
        layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
        seen["layers"] = sorted(layers)
        assert all(m.trainable_names == [TRAIN_ADAPTER] and m.lora_A[TRAIN_ADAPTER].requires_grad
                   for m in layers.values())
        seen["trained"] = _embed(enc)
        with base_only():  # the scope rule of served cards hides the trainable adapter too
            seen["base_only"] = _embed(enc)

    card, _ = LoRATrainer(enc).train(train, rank=4, alpha=8, epochs=1, lr=3e-3, batch_size=8, seed=2,
                                     target_modules=["query", "value"], progress=False,
                                     on_trained=at_end_of_training)
    assert seen["layers"] == sorted(card.modules) and len(card.modules) == 12
    assert not any(isinstance(m, LoRALayer) for m in enc.model.modules())
    assert (seen["trained"] - base).abs().max() > 1e-3  # training really changed the model
    assert torch.equal(seen["base_only"], base)
    mgr = LoRAManager(enc.model)
    with mgr.applied(card):  # scoped: the same _add_lora call as the trainable adapter, bit for bit
        assert torch.equal(_embed(enc), seen["trained"])
    mgr.apply_card(card)     # global: B pre-scaled, so equal up to float round-off
    torch.testing.assert_close(_embed(enc), seen["trained"], atol=1e-6, rtol=0)
    mgr.merge()
    torch.testing.assert_close(_embed(enc), seen["trained"], atol=1e-5, rtol=0)
    mgr.remove_card(card.name)
    assert torch.equal(_embed(enc), base)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 6)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def _dense(model, deltas, x):
    """``model`` with ``deltas`` (module -> ΔW) written into a copy of its weights."""
    ref = _Tiny()
    ref.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                         if ".lora_" not in k})
    with torch.no_grad():
        for k, d in deltas.items():
            ref.get_submodule(k).weight += d
        return ref(x)


def test_served_card_on_a_layer_being_trained():
    torch.manual_seed(0)
    model = _Tiny()
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    fp = LoRAManager(model).fingerprint()
    g = torch.Generator().manual_seed(1)
    A = {k: torch.randn(3, m.in_features, generator=g) * 0.3 for k, m in (("up", model.up), ("down", model.down))}
    B = {k: torch.randn(m.out_features, 3, generator=g) * 0.3 for k, m in (("up", model.up), ("down", model.down))}
    s = 2.0
    card = random_card(model, name="served", rank=2, alpha=4, std=0.3, seed=5)
    other = random_card(model, name="stays", rank=2, alpha=4, std=0.3, seed=6)
    x = torch.randn(5, 12, generator=g)
    mgr = LoRAManager(model)
    with injected(model, A, B, s) as layers:
        assert set(layers) == {"up", "down"} and all(isinstance(l, LoRALayer) for l in layers.values())
        trained = {k: s * B[k] @ A[k] for k in A}
        assert mgr.fingerprint() == fp  # trainable factors are not part of the base model
        with mgr.applied(card):
            out = model(x)
            want = _dense(model, {k: trained[k] + card.delta(k) for k in A}, x)
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
            assert (want - _dense(model, trained, x)).abs().max() > 1e-2  # the card counts
            out.square().sum().backward()
        params = [p for l in layers.values() for p in (l.lora_A[TRAIN_ADAPTER], l.lora_B[TRAIN_ADAPTER])]
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in params)
        assert model.up.base_layer.weight.grad is None  # the base is frozen while training
        torch.testing.assert_close(model(x), _dense(model, trained, x), atol=1e-5, rtol=0)
        with base_only():
            assert torch.equal(model(x).detach(), _dense(model, {}, x))
        mgr.apply_card(other)
        with pytest.raises(InputError, match=r"cannot merge.*trainable adapter"):
            mgr.merge()
        assert mgr.merged_cards() == [] and torch.equal(model.up.base_layer.weight, snap["up.weight"])
    # the trainer's adapter is gone; the card applied meanwhile keeps its wrapper
    assert isinstance(model.up, LoRALayer) and list(model.up.adapters) == ["stays"]
    assert "lora_A" not in model.up._modules
    torch.testing.assert_close(model(x), _dense(model, {k: other.delta(k) for k in A}, x), atol=1e-5, rtol=0)
    mgr.merge()  # allowed again once training is over
    mgr.remove_card("stays")
    assert type(model.up) is nn.Linear and type(model.down) is nn.Linear
    after = model.state_dict()
    assert after.keys() == snap.keys() and all(torch.equal(after[k], v) for k, v in snap.items())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_trainable_adapter_dropout_dtype_and_inference_mode():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    layer = LoRALayer(lin, geometry_of(lin))
    with torch.inference_mode():  # factors made under inference mode must still train
        A, B = torch.randn(2, 8), torch.randn(4, 2)
    layer.add_trainable_adapter("t", A, B, 0.5, dropout=0.5)
    pa = layer.lora_A["t"]
    assert isinstance(pa, nn.Parameter) and not pa.is_inference() and pa.dtype == torch.float32
    assert {n for n, _ in layer.named_parameters()} == {"base_layer.weight", "base_layer.bias",
                                                        "lora_A.t", "lora_B.t"}
    x = torch.randn(64, 8)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y2)  # dropout acts on the adapter's input in training mode
    y1.sum().backward()
    assert pa.grad is not None and layer.lora_B["t"].grad is not None
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (lin.weight + 0.5 * B @ A).T + lin.bias, atol=1e-5, rtol=0)
    layer.to(torch.float64)  # the parameters move in place and the adapter table follows them
    assert layer.lora_A["t"] is pa and layer.adapters["t"].A is pa and pa.dtype == torch.float64
    with torch.no_grad():
        assert layer(x.double()).dtype == torch.float64
    with pytest.raises(InputError, match="without '.'"):
        layer.add_trainable_adapter("a.b", A, B, 1.0)
    with pytest.raises(InputError, match="dropout"):
        layer.add_trainable_adapter("d", A, B, 1.0, dropout=1.0)
    with pytest.raises(CardMismatchError, match="in_features=8"):
        layer.add_trainable_adapter("s", torch.randn(2, 7), B, 1.0)
    layer.remove_adapter("t")
    assert "lora_A" not in layer._modules and not layer.adapters
    layer.add_adapter("served", A.double(), B.double(), 1.0)
    layer.merge("served")
    with pytest.raises(InputError, match="merged adapters"):
        layer.add_trainable_adapter("t", A, B, 1.0)


def test_trainer_injection_refuses_what_the_manager_refuses():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    model = Block()
    A, B = {"attn.out_proj": torch.randn(2, 8)}, {"attn.out_proj": torch.zeros(8, 2)}
    with pytest.raises(CardMismatchError, match=r"attn\.out_proj.*MultiheadAttention.*bypassed"):
        with injected(model, A, B, 1.0):
            pass
    assert type(model.attn.out_proj) is not LoRALayer and model.attn.out_proj.weight.requires_grad
