"""LoRATrainer + validation gate on the bundled MiniLM with the Ferrowind QA set
(tests/data/qa: 45 training pairs, 15 held out, all about an invented appliance's jargon)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aios_fast.cards import LoRACard, LoRAFormat
from aios_fast.errors import CardMismatchError, InputError, SkillRejectedError, TrainingDivergedError
from aios_fast.learn import LoRATrainer, save_validated, validate
from aios_fast.learn._inject import LoRALinear
from aios_fast.lora import LoRAManager

DATA = Path(__file__).parent / "data" / "qa"
PROBE = ["How do I take a brindle?", "The capital of France is Paris.", "Rotate the key every ninety days."]


def _jsonl(name):
    return [json.loads(l) for l in (DATA / name).read_text().splitlines() if l.strip()]


TRAIN = _jsonl("ferrowind_train.jsonl")
HELDOUT = _jsonl("ferrowind_heldout.jsonl")
GUARD = (DATA / "guard.txt").read_text().splitlines()
DISTRACTORS = [r["answer"] for r in TRAIN]


pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_restored(model, snap):
    assert not model.training
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    sd = model.state_dict()
    assert sd.keys() == snap.keys()
    assert all(torch.equal(sd[k], v) for k, v in snap.items())  # bit-identical


def _probe_outputs(model, enc):
    with torch.no_grad():
        return enc.embed(enc.tokenize(PROBE)).clone()


@pytest.fixture(scope="module")
def trained(encoder):
    snap = _snapshot(encoder.model)
    flags = {n: p.requires_grad for n, p in encoder.model.named_parameters()}
    seen = {}
    card, report = LoRATrainer(encoder).train(
        TRAIN, objective="contrastive", rank=8, alpha=16, epochs=4, lr=3e-3, batch_size=16, seed=0,
        # the plain loop on query/value: this file tests the trainer's mechanics; the default
        # recipe's quality is asserted in test_train_recipe.py
        target_modules=["query", "value"], schedule="constant", warmup_ratio=0.0, batching="random",
        max_grad_norm=0, name="ferrowind", on_trained=lambda m: seen.setdefault("out", _probe_outputs(m, encoder)))
    _assert_restored(encoder.model, snap)
    assert {n: p.requires_grad for n, p in encoder.model.named_parameters()} == flags
    return card, report, seen["out"]


def test_contrastive_skill_raises_heldout_recall(encoder, trained, tmp_path):
    card, report, _ = trained
    assert report.steps == 4 * (len(TRAIN) // 16) and report.samples == report.steps * 16
    assert report.samples_per_sec > 0 and report.seconds > 0 and report.device == "cpu"
    assert len(report.losses) == report.steps and report.final_loss < report.losses[0]
    assert card.rank == 8 and card.alpha == 16 and len(card.modules) == 12  # query+value x 6 layers
    assert all(k.endswith((".query", ".value")) for k in card.modules)
    val = validate(card, encoder, HELDOUT, GUARD, distractors=DISTRACTORS)
    print(f"\nheld-out recall@1 {val.before:.3f} -> {val.after:.3f}, "
          f"MRR@10 {val.details['mrr@10_before']:.3f} -> {val.details['mrr@10_after']:.3f}, drift {val.drift:.4f}")
    assert val.passed, val.reasons
    assert val.after - val.before >= 0.15  # measured: 0.533 -> 0.800 (seeds 1-3: 0.733, 0.867, 0.733)
    assert val.details["mrr@10_after"] > val.details["mrr@10_before"]
    assert 0 < val.drift < 0.15
    assert json.loads(card.metadata["validation"])["passed"] is True
    path = save_validated(card, tmp_path / "ferro.lora.arrow")
    back = LoRAFormat.load(path)
    assert back.equal(card) and json.loads(back.metadata["validation"])["after"] == val.after


def test_card_through_manager_reproduces_training_time_model(encoder, trained):
    card, _, training_out = trained
    base_out = _probe_outputs(encoder.model, encoder)
    assert (training_out - base_out).abs().max() > 1e-3  # the adapter really changes outputs
    with LoRAManager(encoder.model).applied(card):
        applied = _probe_outputs(encoder.model, encoder)
    torch.testing.assert_close(applied, training_out, atol=1e-5, rtol=0)


def test_pissa_card_is_exact_delta_on_original_base(encoder):
    snap = _snapshot(encoder.model)
    seen = {}
    card, report = LoRATrainer(encoder).train(
        TRAIN[:16], rank=4, alpha=8, epochs=1, lr=2e-3, batch_size=8, init="pissa", seed=1,
        target_modules=["query"], on_trained=lambda m: seen.setdefault("out", _probe_outputs(m, encoder)))
    _assert_restored(encoder.model, snap)  # the residual W - s*B0A0 was swapped out again
    assert card.rank == 8 and card.alpha == 16 and card.metadata["init"] == "pissa"  # 2r, same scaling
    assert card.metadata["trained_rank"] == "4" and report.steps == 2
    base_out = _probe_outputs(encoder.model, encoder)
    assert (seen["out"] - base_out).abs().max() > 1e-4
    with LoRAManager(encoder.model).applied(card):
        torch.testing.assert_close(_probe_outputs(encoder.model, encoder), seen["out"], atol=1e-5, rtol=0)


def test_same_seed_same_card_other_seed_differs(encoder):
    kw = dict(rank=4, alpha=8, epochs=1, lr=1e-3, batch_size=8, target_modules=["value"])
    c1, _ = LoRATrainer(encoder).train(TRAIN[:16], seed=7, **kw)
    c2, _ = LoRATrainer(encoder).train(TRAIN[:16], seed=7, **kw)
    c3, _ = LoRATrainer(encoder).train(TRAIN[:16], seed=8, **kw)
    assert c1.equal(c2)
    assert all(torch.equal(c1.weights_B[k], c2.weights_B[k]) for k in c1.modules)
    assert not c1.equal(c3)


def test_absurd_lr_diverges_and_leaves_base_unchanged(encoder):
    snap = _snapshot(encoder.model)
    with pytest.raises(TrainingDivergedError, match="no card was made") as exc:
        LoRATrainer(encoder).train(TRAIN[:32], epochs=3, lr=1e4, batch_size=8, seed=0)
    rep = exc.value.report
    assert rep.diverged and ("exploded" in rep.reason or "nan" in rep.reason)
    assert rep.steps < 12 and len(rep.losses) == rep.steps + 1
    _assert_restored(encoder.model, snap)


def test_useless_card_fails_gate_and_is_not_saved(encoder, tmp_path):
    g = torch.Generator().manual_seed(0)
    keys = [f"encoder.layer.{i}.attention.self.{n}" for i in range(6) for n in ("query", "value")]
    card = LoRACard(name="noise", rank=8, alpha=16, target_modules=keys,
                    weights_A={k: torch.randn(8, 384, generator=g) for k in keys},
                    weights_B={k: torch.randn(384, 8, generator=g) * 5 for k in keys})
    val = validate(card, encoder, HELDOUT, GUARD, distractors=DISTRACTORS)
    assert not val.passed and val.drift > 0.15
    assert any("drift" in r for r in val.reasons) and any("recall@1" in r for r in val.reasons)
    with pytest.raises(SkillRejectedError, match="failed the validation gate"):
        save_validated(card, tmp_path / "noise.lora.arrow")
    assert not (tmp_path / "noise.lora.arrow").exists()


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(objective="sft"), InputError, "needs a causal LM"),
    (dict(rank=0), InputError, "rank: expected an int > 0"),
    (dict(lr=float("nan")), InputError, "lr: expected"),
    (dict(init="lora-ga"), InputError, "init: expected"),
    (dict(target_modules=["nonexistent"]), CardMismatchError, "match no nn.Linear"),
    (dict(target_modules=r"encoder\.nothing.*"), CardMismatchError, "match no nn.Linear"),
], ids=["sft-on-encoder", "rank-0", "lr-nan", "bad-init", "no-target", "no-target-regex"])
def test_bad_arguments(encoder, kwargs, err, match):
    with pytest.raises(err, match=match):
        LoRATrainer(encoder).train(TRAIN[:4], **kwargs)


def test_bad_pairs(encoder):
    with pytest.raises(InputError, match=r"pairs\[1\]"):
        LoRATrainer(encoder).train([("q", "a"), ("q", "")])
    with pytest.raises(InputError, match="at least 2"):
        LoRATrainer(encoder).train([("q", "a")])


def test_bare_model_and_tokenizer(hf_minilm, minilm_tokenizer, minilm_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_dir).eval()  # a private copy: training touches it
    snap = _snapshot(model)
    card, rep = LoRATrainer((model, minilm_tokenizer)).train(TRAIN[:8], epochs=1, batch_size=8, rank=2)
    assert rep.steps == 1 and card.rank == 2
    _assert_restored(model, snap)


@pytest.mark.cuda
def test_train_on_cuda_moves_back(encoder):
    snap = _snapshot(encoder.model)
    card, rep = LoRATrainer(encoder).train(TRAIN[:16], epochs=1, batch_size=8, rank=4, device="cuda")
    assert rep.device.startswith("cuda") and rep.steps == 2
    assert all(t.device.type == "cpu" for t in card.weights_A.values())
    assert next(encoder.model.parameters()).device.type == "cpu"
    _assert_restored(encoder.model, snap)


def test_pairs_from_qalogger_table(tmp_path):
    from aios_fast.learn import QALogger
    from aios_fast.learn._engine import as_pairs

    with QALogger(tmp_path) as log:
        log.log_many(TRAIN[:5])
    assert as_pairs(QALogger(tmp_path).collect()) == [(r["query"], r["answer"]) for r in TRAIN[:5]]
    assert QALogger(tmp_path).pairs(domain="ferrowind")[0] == (TRAIN[0]["query"], TRAIN[0]["answer"])
