"""Cards to and from PEFT: exact round trips, and a card written as a PEFT adapter, loaded
by the real ``peft.PeftModel.from_pretrained`` on the bundled MiniLM, changes the outputs by
exactly what ``W + scaling·B@A`` predicts."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from aios_fast import CardFormatError
from aios_fast.cards import LoRACard, LoRAFormat
from aios_fast.interop.peft import from_peft, to_peft

SUBMODULES = {  # HF BERT sub-module -> (out, in)
    "attention.self.query": (384, 384),
    "attention.self.value": (384, 384),
    "attention.output.dense": (384, 384),
    "intermediate.dense": (1536, 384),
    "output.dense": (384, 1536),
}


def minilm_card(dtype=torch.float32, scale=0.02, seed=0) -> LoRACard:
    """Rank 8 on even layers, rank 4 on odd ones, alpha 4 on layer 3: every pattern used."""
    g = torch.Generator().manual_seed(seed)
    A, B, rp, ap = {}, {}, {}, {}
    for i in range(6):
        for sub, (o, n) in SUBMODULES.items():
            k = f"encoder.layer.{i}.{sub}"
            r = 8 if i % 2 == 0 else 4
            A[k] = (torch.randn(r, n, generator=g) * scale).to(dtype)
            B[k] = (torch.randn(o, r, generator=g) * scale).to(dtype)
            if r != 8:
                rp[k] = r
            if i == 3:
                ap[k] = 4.0
    return LoRACard("minilm-skill", 8, 16.0, sorted(A), A, B, metadata={"description": "t"},
                    rank_pattern=rp, alpha_pattern=ap, base_fingerprint="fp1:0123")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="f32"),
                                   pytest.param(torch.bfloat16, id="bf16")])
def test_card_peft_card_round_trip_exact(tmp_path, dtype):
    c = minilm_card(dtype)
    to_peft(c, tmp_path / "adapter", base_model_name_or_path="all-MiniLM-L6-v2")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16.0
    assert len(cfg["rank_pattern"]) == 15 and len(cfg["alpha_pattern"]) == 5
    assert cfg["base_model_name_or_path"] == "all-MiniLM-L6-v2"
    back = from_peft(tmp_path / "adapter")
    assert back.equal(c)


def test_arrowengine_named_card_goes_out_as_hf_and_comes_back(tmp_path):
    c = minilm_card().with_naming("arrowengine")
    to_peft(c, tmp_path / "a")
    from safetensors import safe_open

    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in f.keys()
    assert from_peft(tmp_path / "a").equal(c)


def test_v2_to_peft_to_v2_file_round_trip(tmp_path):
    c = minilm_card()
    p1 = LoRAFormat.save(c, tmp_path / "a.lora.arrow")
    to_peft(LoRAFormat.load(p1), tmp_path / "peft")
    p2 = LoRAFormat.save(from_peft(tmp_path / "peft"), tmp_path / "b.lora.arrow")
    assert p1.read_bytes() == p2.read_bytes()


def _encode(model, tok, texts):
    """Hidden states of the real tokens only: padded positions carry no meaning and amplify
    rounding differences, so they are left out of the comparison."""
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).last_hidden_state[batch["attention_mask"].bool()]


TEXTS = ["skill cards carry low-rank deltas", "hello world", "a node learns while it sleeps"]


def test_peft_loads_our_adapter_and_matches_merged_delta(tmp_path, hf_minilm, minilm_tokenizer):
    from peft import PeftModel

    card = minilm_card(scale=0.01)
    to_peft(card, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf_minilm), tmp_path / "adapter").eval()
    merged = copy.deepcopy(hf_minilm)
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for k in card.modules:
            mods[k].weight += card.delta(k)
    base = _encode(hf_minilm, minilm_tokenizer, TEXTS)
    got = _encode(peft_model, minilm_tokenizer, TEXTS)
    want = _encode(merged, minilm_tokenizer, TEXTS)
    assert (got - base).abs().max() > 0.05  # the adapter really changes the output ...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # ... by exactly B·A's amount
    # PEFT saw the per-module ranks and alphas
    lora_layer = dict(peft_model.named_modules())["base_model.model.encoder.layer.3.output.dense"]
    assert lora_layer.r["default"] == 4 and lora_layer.scaling["default"] == 1.0
    assert dict(peft_model.named_modules())[
        "base_model.model.encoder.layer.0.output.dense"].scaling["default"] == 2.0


def test_from_peft_reads_peft_saved_adapter(tmp_path, hf_minilm):
    """An adapter saved by PEFT itself (rank/alpha patterns, rsLoRA off) reads back with the
    weights PEFT holds and PEFT's scalings."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                     rank_pattern={"layer.1.attention.self.query": 2},
                     alpha_pattern={"layer.2.attention.self.value": 3})
    model = get_peft_model(copy.deepcopy(hf_minilm), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "saved")
    card = from_peft(tmp_path / "saved")
    assert len(card.modules) == 12 and card.rank == 4 and card.alpha == 8.0
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            key = re.sub(r"^base_model\.model\.", "", name)
            assert card.module_rank(key) == layer.r["default"]
            assert card.scaling(key) == pytest.approx(layer.scaling["default"])
            torch.testing.assert_close(card.weights_B[key], layer.lora_B["default"].weight, atol=0, rtol=0)


def test_from_peft_handles_default_suffix_and_rslora(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "raw"
    d.mkdir()
    A, B = torch.randn(4, 8), torch.randn(6, 4)
    save_file({"base_model.model.blk.q.lora_A.default.weight": A,
               "base_model.model.blk.q.lora_B.default.weight": B}, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q"]}))
    card = from_peft(d)
    assert card.modules == ["blk.q"] and card.name == "raw"
    assert card.scaling("blk.q") == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    torch.testing.assert_close(card.weights_A["blk.q"], A, atol=0, rtol=0)


@pytest.mark.parametrize(("config", "keys", "match"), [
    pytest.param({"peft_type": "IA3", "r": 4, "lora_alpha": 8}, None, "not LORA", id="not-lora"),
    pytest.param({"r": 4, "lora_alpha": 8, "use_dora": True}, None, "DoRA", id="dora"),
    pytest.param({"r": 4, "lora_alpha": 8, "bias": "all"}, None, "bias", id="bias"),
    pytest.param({"lora_alpha": 8}, None, "r / lora_alpha", id="no-r"),
    pytest.param({"r": 4, "lora_alpha": 8}, ["base_model.model.q.lora_A.weight"], "not paired", id="unpaired"),
    pytest.param({"r": 4, "lora_alpha": 8}, ["base_model.model.emb.lora_embedding_A"], "not a LoRA", id="embedding"),
])
def test_from_peft_refuses(tmp_path, config, keys, match):
    from safetensors.torch import save_file

    keys = keys or ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight"]
    tensors = {k: torch.ones(4, 4) for k in keys}
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CardFormatError, match=match):
        from_peft(tmp_path)


def test_from_peft_refuses_missing_and_garbage(tmp_path):
    with pytest.raises(CardFormatError, match="adapter_config.json is missing"):
        from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CardFormatError, match="not valid JSON"):
        from_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    with pytest.raises(CardFormatError, match="safetensors"):
        from_peft(tmp_path)


def test_from_peft_refuses_malformed_aios_header(tmp_path):
    from safetensors.torch import save_file

    save_file({"base_model.model.q.lora_A.weight": torch.ones(2, 4),
               "base_model.model.q.lora_B.weight": torch.ones(4, 2)},
              tmp_path / "adapter_model.safetensors", metadata={"aios_card": "{broken"})
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    with pytest.raises(CardFormatError, match="aios_card is malformed"):
        from_peft(tmp_path)
