"""LoRALayer mechanics on plain layers and a real GPT-2 (transformers Conv1D), dtype and device
following. MiniLM-level behaviour lives in test_manager*.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aios_fast.errors import CardMismatchError
from aios_fast.lora import LoRAManager
from aios_fast.lora.layer import (DISPATCHERS, LoRALayer, dispatch_conv1d, dispatch_linear,
                                  geometry_of)
from aios_fast.lora.random import linear_shapes, random_card

# Tolerance per base dtype (relative to output scale ~1): half precision rounds each matmul.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"),
          pytest.param(torch.bfloat16, id="bfloat16")]


def _factors(in_f, out_f, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, in_f, generator=g) * 0.1, torch.randn(out_f, r, generator=g) * 0.1


# --------------------------------------------------------------------------- dispatch
def test_dispatch_chain_order_and_kinds():
    from transformers.pytorch_utils import Conv1D

    assert DISPATCHERS == [dispatch_linear, dispatch_conv1d]
    lin = geometry_of(nn.Linear(6, 4))
    assert (lin.in_features, lin.out_features, lin.fan_in_fan_out, lin.kind) == (6, 4, False, "linear")
    conv = geometry_of(Conv1D(nf=4, nx=6))  # weight (in=6, out=4)
    assert (conv.in_features, conv.out_features, conv.fan_in_fan_out, conv.kind) == (6, 4, True, "conv1d")
    assert dispatch_conv1d(nn.Linear(2, 2)) is None and dispatch_linear(Conv1D(2, 2)) is None


def test_unsupported_layer_lists_supported_types():
    with pytest.raises(CardMismatchError, match=r"Conv2d.*supported types: torch\.nn\.Linear, "
                                                r"transformers\.pytorch_utils\.Conv1D"):
        geometry_of(nn.Conv2d(3, 3, 1), "features.0")
    with pytest.raises(ValueError):  # CardMismatchError is also a ValueError
        geometry_of(nn.Embedding(4, 4))


# --------------------------------------------------------------------------- forward / merge
@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(16, 12)


def test_forward_equals_dense_update(linear):
    A1, B1 = _factors(16, 12, 4, 1)
    A2, B2 = _factors(16, 12, 2, 2)
    layer = LoRALayer(linear, geometry_of(linear))
    layer.add_adapter("one", A1, B1, scaling=2.0, weight=0.5)
    layer.add_adapter("two", A2, B2, scaling=0.5, weight=-1.5)
    x = torch.randn(3, 5, 16)
    W = linear.weight + 0.5 * 2.0 * B1 @ A1 - 1.5 * 0.5 * B2 @ A2
    expected = x @ W.T + linear.bias
    out = layer(x)
    assert (out - linear(x)).abs().max() > 1e-2  # the adapters really act
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_shape_mismatch_is_refused(linear):
    layer = LoRALayer(linear, geometry_of(linear))
    A, B = _factors(15, 12, 4)
    with pytest.raises(CardMismatchError, match=r"in_features=16, out_features=12"):
        layer.add_adapter("bad", A, B, 1.0)
    assert not layer.adapters


@pytest.mark.parametrize("exact", [pytest.param(True, id="exact-copy"), pytest.param(False, id="subtract")])
def test_merge_unmerge_restores_weights(linear, exact):
    base = linear.weight.detach().clone()
    layer = LoRALayer(linear, geometry_of(linear), exact_unmerge=exact)
    for i, w in enumerate((1.0, 0.3)):
        layer.add_adapter(f"a{i}", *_factors(16, 12, 4, i), scaling=2.0, weight=w)
    x = torch.randn(4, 16)
    unmerged = layer(x)
    layer.merge("a0")
    layer.merge("a1")
    assert (linear.weight - base).abs().max() > 1e-2
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge("a0")  # one still merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    layer.unmerge("a1")
    assert (linear.weight - base).abs().max() <= 1e-6
    if exact:
        assert torch.equal(linear.weight, base)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- GPT-2 Conv1D
@pytest.fixture
def gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16, vocab_size=64)
    return GPT2Model(cfg).eval()


def test_gpt2_conv1d_card_matches_transposed_update(gpt2):
    from transformers.pytorch_utils import Conv1D

    shapes = linear_shapes(gpt2)
    assert shapes and all(isinstance(gpt2.get_submodule(k), Conv1D) for k in shapes)
    assert shapes["h.0.attn.c_attn"] == (32, 96)  # Conv1D weight is (in, out) = (32, 96)
    card = random_card(shapes, name="gpt2-skill", rank=4, alpha=8, std=0.1)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = gpt2(ids).last_hidden_state
        ref_model = type(gpt2)(gpt2.config).eval()
        ref_model.load_state_dict(gpt2.state_dict())
        for k in shapes:  # Conv1D stores W as (in, out): add ΔWᵀ
            ref_model.get_submodule(k).weight += 0.7 * card.delta(k).T
        expected = ref_model(ids).last_hidden_state
        mgr = LoRAManager(gpt2)
        mgr.apply_card(card, weight=0.7)
        assert isinstance(gpt2.h[0].attn.c_attn, LoRALayer)
        out = gpt2(ids).last_hidden_state
        assert (out - base).abs().max() > 1e-2
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
        mgr.merge()
        torch.testing.assert_close(gpt2(ids).last_hidden_state, expected, atol=1e-5, rtol=0)
        mgr.unmerge()
        mgr.remove_card("gpt2-skill")
        assert isinstance(gpt2.h[0].attn.c_attn, Conv1D)
        assert torch.equal(gpt2(ids).last_hidden_state, base)


# --------------------------------------------------------------------------- dtype / device
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_factors_follow_base_dtype(dtype):
    torch.manual_seed(0)
    model = _Tiny()
    card = random_card(model, name="s", rank=4, alpha=8, std=0.2)  # float32 card
    x = torch.randn(8, 32)
    ref = _Tiny()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for k in ("up", "down"):
            ref.get_submodule(k).weight += card.delta(k)
        expected = ref(x)
    model.to(dtype)
    mgr = LoRAManager(model)
    mgr.apply_card(card)
    for k in ("up", "down"):
        ad = model.get_submodule(k).adapters["s"]
        assert ad.A.dtype == dtype and ad.B.dtype == dtype
    with torch.no_grad():
        out = model(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])
    # and after the model changes dtype again, the factors follow
    model.to(torch.float32)
    assert model.up.adapters["s"].A.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_in_half_precision_restores_exactly(dtype):
    torch.manual_seed(0)
    model = _Tiny().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = LoRAManager(model)
    mgr.apply_card(random_card(model, name="h", rank=4, std=0.2))
    mgr.merge()
    assert not torch.equal(model.up.base_layer.weight, before["up.weight"])
    mgr.remove_card("h")  # unmerges from the exact copy
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_factors_follow_model_to_device(device):
    torch.manual_seed(0)
    model = _Tiny()
    mgr = LoRAManager(model)
    mgr.apply_card(random_card(model, name="d", rank=4, std=0.2))
    x = torch.randn(4, 32)
    with torch.no_grad():
        expected = model(x)
        model.to(device)
        assert model.up.adapters["d"].A.device.type == device
        out = model(x.to(device)).cpu()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
