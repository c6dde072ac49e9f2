"""SFT skill on the bundled SmolLM2-135M-Instruct: a short run lowers held-out answer NLL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aios_fast.learn import LoRATrainer, validate
from aios_fast.learn._inject import LoRALinear

DATA = Path(__file__).parent / "data" / "qa"
# LoRA on the top half only: the backward pass stops at the lowest adapted layer (CPU budget)
TOP_QV = r"model\.layers\.(1[5-9]|2[0-9])\.self_attn\.(q|v)_proj"


def _jsonl(name):
    return [json.loads(l) for l in (DATA / name).read_text().splitlines() if l.strip()]


@pytest.mark.slow
def test_sft_skill_lowers_heldout_answer_nll(one_thread):
    from aios_fast.engines import CausalLM

    lm = CausalLM()
    snap = {k: v.clone() for k, v in lm.model.state_dict().items()}
    train, heldout = _jsonl("ferrowind_train.jsonl")[:24], _jsonl("ferrowind_heldout.jsonl")[:8]
    guard = (DATA / "guard.txt").read_text().splitlines()[:8]
    card, rep = LoRATrainer(lm).train(train, objective="sft", rank=4, alpha=8, epochs=1, lr=5e-3,
                                      batch_size=8, seed=0, target_modules=TOP_QV)
    assert rep.objective == "sft" and rep.steps == 3
    assert len(card.modules) == 30 and all(k.endswith(("q_proj", "v_proj")) for k in card.modules)
    assert not any(isinstance(m, LoRALinear) for m in lm.model.modules()) and not lm.model.training
    assert all(torch.equal(v, lm.model.state_dict()[k]) for k, v in snap.items())
    val = validate(card, lm, heldout, guard)
    print(f"\nheld-out answer NLL {val.before:.3f} -> {val.after:.3f} nats/token; "
          f"guard NLL change {val.drift:+.4f}")
    assert val.passed, val.reasons
    assert val.before - val.after >= 0.2  # measured: 4.67 -> 4.32


def test_sft_labels_mask_prompt_and_padding():
    """Only answer tokens (and the end-of-turn) carry labels; uses the tokenizer alone."""
    from transformers import AutoTokenizer

    from aios_fast.bundled import smollm2_gguf
    from aios_fast.learn._engine import sft_batch

    p = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    def chat(q):
        return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=False)
    batch = sft_batch(tok, [("What is a glint?", "A heartbeat."), ("Long question " * 5, "Ok.")], chat)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    ans = tok.decode([t for t in labels[0].tolist() if t != -100])
    assert ans.startswith("A heartbeat.") and "<|im_end|>" in ans and "glint" not in ans
    assert (labels[mask == 0] == -100).all()  # padding masked
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a glint?"}],
                                     add_generation_prompt=True, tokenize=False)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert (labels[0, :n_prompt] == -100).all() and (labels[0, n_prompt:mask[0].sum()] != -100).all()
