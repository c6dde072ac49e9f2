"""The trainer's default recipe (learn/recipe.py): duplicate-free batches, answer groups, hard
negatives, the group-masked loss, the schedule, the per-objective defaults, and - on the
Ferrowind TEST set, which was not used to choose the defaults - a clear held-out gain with
bounded guard drift from ``LoRATrainer`` with no hyper-parameters given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aios_fast.errors import InputError
from aios_fast.learn import recipe
from aios_fast.learn.recipe import (OBJECTIVE_DEFAULTS, answer_groups, contrastive_loss, lr_factor,
                                    mine_hard_negatives, plan_batches)
from aios_fast.learn.trainer import TrainConfig

DATA = Path(__file__).parent / "data" / "qa"


def _jsonl(name):
    return [json.loads(l) for l in (DATA / name).read_text().splitlines() if l.strip()]


def test_answer_groups_join_exact_and_near_duplicates():
    answers = ["Reboot the hub.", "reboot   the HUB", "Call support.", "Wait an hour.", "Wait one hour."]
    assert answer_groups(answers) == [0, 0, 1, 2, 3]  # case, spacing, punctuation aside
    emb = F.normalize(torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0.1, 1.0]]), dim=1)
    assert answer_groups(answers, emb, near_duplicate=0.95) == [0, 0, 1, 2, 2]
    assert answer_groups(answers, emb, near_duplicate=0.999) == [0, 0, 1, 2, 3]
    with pytest.raises(InputError, match="one per answer"):
        answer_groups(answers, emb[:2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unique_batches_never_repeat_a_group(seed):
    groups = [i // 2 for i in range(60)] + [30] * 5  # pairs share answers; one answer asked 5 times
    plan = plan_batches(groups, 16, 3, torch.Generator().manual_seed(seed), "unique")
    assert plan and all(len(b) == 16 for b in plan)
    assert all(len({groups[i] for i in b}) == 16 for b in plan)
    per_epoch = len(plan) // 3
    assert per_epoch == 4  # 65 pairs -> 4 full batches per epoch, none lost to the rule here
    for e in range(3):  # each pair at most once per epoch
        seen = [i for b in plan[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert len(seen) == len(set(seen))


def test_unique_batches_shrink_to_the_number_of_groups_and_random_is_the_old_order():
    plan = plan_batches([0, 0, 1, 1, 2, 2], 16, 1, torch.Generator().manual_seed(0), "unique")
    assert [len(b) for b in plan] == [3, 3]
    g = torch.Generator().manual_seed(5)
    old = torch.randperm(40, generator=g).tolist()
    new = plan_batches(range(40), 16, 1, torch.Generator().manual_seed(5), "random")
    assert new == [old[:16], old[16:32]]
    with pytest.raises(InputError, match="batching"):
        plan_batches([0, 1], 2, 1, torch.Generator(), "greedy")


@pytest.mark.parametrize("seed", [0, 3])
def test_grouped_batches_hold_whole_groups_and_lose_no_pair(seed):
    groups = [i // 3 for i in range(111)] + [37] * 5       # 38 groups; one answer asked 5 times
    plan = plan_batches(groups, 16, 2, torch.Generator().manual_seed(seed), "grouped")
    assert len(plan) == 2 * 2                                # round(38 / 16) batches per epoch
    for e in range(2):
        epoch = plan[e * 2:(e + 1) * 2]
        assert sorted(i for b in epoch for i in b) == list(range(len(groups)))   # every pair, once
        assert sorted(len({groups[i] for i in b}) for b in epoch) == [19, 19]     # even split
    for b in plan:   # a group is never split across batches
        for g in {groups[i] for i in b}:
            assert sum(groups[i] == g for i in b) == groups.count(g)
    assert plan[:2] != plan[2:]                              # a fresh order per epoch


def test_grouped_loss_shares_one_answer_column_per_group():
    torch.manual_seed(1)
    q, a = F.normalize(torch.randn(4, 8), dim=1), F.normalize(torch.randn(2, 8), dim=1)
    rows, cols, tgt = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1]), torch.tensor([0, 0, 1, 1])
    got = contrastive_loss(q, a, 20.0, rows, cols, targets=tgt)
    torch.testing.assert_close(got, F.cross_entropy(q @ a.T * 20.0, tgt))
    # a hard-negative column of a row's own group is masked for that row only
    extra = torch.cat([a, a[1:2]])
    got = contrastive_loss(q, extra, 20.0, rows, torch.tensor([0, 1, 1]), targets=tgt)
    logits = q @ extra.T * 20.0
    logits[2:, 2] = float("-inf")
    torch.testing.assert_close(got, F.cross_entropy(logits, tgt))
    with pytest.raises(InputError, match="one positive column"):
        contrastive_loss(q, a, 20.0, rows, cols, symmetric=True, targets=tgt)
    with pytest.raises(InputError, match="symmetric"):
        TrainConfig(batching="grouped", symmetric=True)


def test_grouped_training_encodes_each_answer_once_per_batch(encoder):
    from aios_fast.learn import LoRATrainer
    from aios_fast.learn._engine import as_engine

    answers = ["Hold the reset button for ten seconds.", "Invoices are emailed on the first of the month.",
               "The ferry leaves from pier four at noon.", "Water the basil twice a week in summer."]
    pairs = [(f"question {i} about topic {i % 4}", answers[i % 4]) for i in range(16)]
    view = as_engine(encoder)
    data = recipe.ContrastiveData(view, pairs, TrainConfig(batching="grouped", batch_size=2, epochs=1))
    batch = data.plan(torch.Generator().manual_seed(0))[0]
    sizes = []
    real = view.embed_texts
    view.embed_texts = lambda texts: (sizes.append(len(texts)), real(texts))[1]
    with torch.no_grad():
        got = data.loss(batch)
    assert sizes == [8, 2]              # 8 questions of 2 groups, each group's answer encoded once
    q = F.normalize(real([pairs[i][0] for i in batch]), dim=-1)
    order = list(dict.fromkeys(i % 4 for i in batch))
    a = F.normalize(real([answers[g] for g in order]), dim=-1)
    with torch.no_grad():
        want = F.cross_entropy(q @ a.T * 20.0, torch.tensor([order.index(i % 4) for i in batch]))
    torch.testing.assert_close(got, want)
    card, rep = LoRATrainer(encoder).train(pairs, epochs=3, batch_size=4, batching="grouped", progress=False,
                                           seed=0, name="grouped", lr=1e-3)
    assert rep.steps == 3 and card.modules          # 4 groups, 4 per batch: one step per epoch


def test_training_forward_buckets_by_length_without_changing_embeddings(encoder):
    from aios_fast.learn._engine import as_engine

    view = as_engine(encoder)
    bucket = view.length_buckets = 4
    # lengths deliberately out of order, more texts than one bucket
    texts = [("word " * n).strip() + "?" for n in (3, 120, 9, 60, 1, 200, 30, 5, 90, 14, 2)]
    assert len(texts) > 2 * bucket
    widths = []
    real = view.embed
    view.embed = lambda batch: (widths.append(batch["input_ids"].shape[1]), real(batch))[1]
    encoder.model.eval()
    try:
        got = view.embed_texts(texts)
        view.embed = real
        want = real(view.tokenize(texts))   # one batch padded to the longest
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)   # same rows, same order
        assert len(widths) == -(-len(texts) // bucket) and widths == sorted(widths)
        assert widths[0] < widths[-1] == view.tokenize(texts)["input_ids"].shape[1]
        # gradients reach every text through the buckets
        encoder.model.train()
        x = encoder.model.embeddings.word_embeddings.weight
        was = x.requires_grad
        x.requires_grad_(True)
        x.grad = None
        view.embed_texts(texts).sum().backward()
        ids = view.tokenize(texts)["input_ids"]
        assert all(float(x.grad[int(row[1])].abs().sum()) > 0 for row in ids)
    finally:
        view.embed = real
        w = encoder.model.embeddings.word_embeddings.weight
        w.requires_grad_(was if "was" in locals() else w.requires_grad)
        w.grad = None
        encoder.model.eval()


def test_length_buckets_are_a_training_option_set_for_the_run_only(encoder):
    from aios_fast.evolve.distiller import DistillConfig
    from aios_fast.learn.trainer import LoRATrainer, TrainConfig

    for bad in (0, -1, 2.5, True, "4"):
        with pytest.raises(InputError, match="length_buckets"):
            TrainConfig(length_buckets=bad)
        with pytest.raises(InputError, match="DistillConfig.length_buckets"):
            DistillConfig(length_buckets=bad)
    assert TrainConfig().length_buckets is None and DistillConfig().length_buckets == 4
    trainer = LoRATrainer(encoder)
    rows = []
    real = trainer.view.embed
    trainer.view.embed = lambda batch: (rows.append(batch["input_ids"].shape[0]), real(batch))[1]
    pairs = [(f"question {i} about part {i}?", "a passage " + "with words " * (5 + 9 * i)) for i in range(8)]
    try:
        _, rep = trainer.train(pairs, epochs=1, batch_size=8, seed=0, progress=False, length_buckets=3)
    finally:
        trainer.view.embed = real
    assert rep.config["length_buckets"] == 3 and rep.steps == 1
    assert max(rows) == 3                                  # every training forward was bucketed
    assert trainer.view.length_buckets is None             # and only for that run


def test_hard_negatives_exclude_the_true_answer_group():
    q = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [0.7, 0.7]]), dim=1)
    a = q.clone()
    groups = [0, 0, 1, 2]  # pairs 0 and 1 share an answer
    hard = mine_hard_negatives(q, a, groups, 1)
    assert hard.shape == (4, 1)
    for i, (j,) in enumerate(hard.tolist()):
        assert groups[j] != groups[i]
    assert hard[0, 0] == 3 and hard[2, 0] == 3  # the closest answer of another group
    assert mine_hard_negatives(q, a, [0, 0, 0, 0], 2).shape == (4, 0)


def test_loss_masks_same_group_columns_and_symmetric_averages():
    torch.manual_seed(0)
    q, a = F.normalize(torch.randn(3, 8), dim=1), F.normalize(torch.randn(3, 8), dim=1)
    rows = torch.tensor([0, 1, 2])
    plain = contrastive_loss(q, a, 20.0, rows, rows)
    ref = F.cross_entropy(q @ a.T * 20.0, torch.arange(3))
    torch.testing.assert_close(plain, ref)
    # a hard-negative column that is row 1's own answer (same group) must not count for row 1
    extra = torch.cat([a, a[1:2]])
    masked = contrastive_loss(q, extra, 20.0, rows, torch.tensor([0, 1, 2, 1]))
    logits = q @ extra.T * 20.0
    logits[1, 3] = float("-inf")
    torch.testing.assert_close(masked, F.cross_entropy(logits, torch.arange(3)))
    sym = contrastive_loss(q, a, 20.0, rows, rows, symmetric=True)
    torch.testing.assert_close(sym, 0.5 * (ref + F.cross_entropy(a @ q.T * 20.0, torch.arange(3))))


def test_lr_factor_warms_up_then_decays_to_zero():
    f = [lr_factor(i, 20, "linear", 0.1) for i in range(20)]
    assert f[0] < f[1] < f[2] == pytest.approx(1.0)  # ceil(0.1 * 20) = 2 warm-up steps
    assert all(x > y for x, y in zip(f[2:], f[3:])) and f[-1] == pytest.approx(1 / 18)
    assert lr_factor(19, 20, "constant", 0.0) == 1.0
    c = [lr_factor(i, 10, "cosine", 0.0) for i in range(10)]
    assert c[0] == 1.0 and c[5] == pytest.approx(0.5) and c[-1] > 0


def test_config_resolves_per_objective_defaults_and_validates():
    c = TrainConfig()
    for k, v in OBJECTIVE_DEFAULTS["contrastive"].items():
        assert getattr(c, k) == v, k
    s = TrainConfig(objective="sft")
    assert (s.epochs, s.lr, s.batching) == (OBJECTIVE_DEFAULTS["sft"]["epochs"], OBJECTIVE_DEFAULTS["sft"]["lr"],
                                            "random")
    assert TrainConfig(rank=4, lr=5e-4).rank == 4 and TrainConfig(lr=5e-4).lr == 5e-4
    for kw, match in [(dict(schedule="step"), "schedule"), (dict(warmup_ratio=1.5), "warmup_ratio"),
                      (dict(batching="x"), "batching"), (dict(hard_negatives=-1), "hard_negatives"),
                      (dict(near_duplicate=0), "near_duplicate"), (dict(symmetric="yes"), "symmetric")]:
        with pytest.raises(InputError, match=match):
            TrainConfig(**kw)
    assert recipe.SCHEDULES == ("constant", "linear", "cosine")


def test_contrastive_needs_two_distinct_answers(encoder):
    from aios_fast.learn import LoRATrainer

    pairs = [("How do I reset it?", "Hold the button."), ("Reset how?", "hold the button")]
    with pytest.raises(InputError, match="at least 2 distinct answers"):
        LoRATrainer(encoder).train(pairs, epochs=1, progress=False)


@pytest.mark.slow
def test_defaults_give_clear_heldout_gain_on_test_set(encoder, one_thread):
    """Ferrowind (tests/data/qa) was not used to choose the defaults."""
    from aios_fast.learn import LoRATrainer, validate

    enc = encoder
    train, held = _jsonl("ferrowind_train.jsonl"), _jsonl("ferrowind_heldout.jsonl")
    guard = (DATA / "guard.txt").read_text().splitlines()
    card, rep = LoRATrainer(enc).train(train, seed=0, progress=False)
    assert rep.config["batching"] == "unique" and rep.config["schedule"] == OBJECTIVE_DEFAULTS["contrastive"]["schedule"]
    val = validate(card, enc, held, guard, distractors=[r["answer"] for r in train])
    print(f"\ndefaults on ferrowind: recall@1 {val.before:.3f} -> {val.after:.3f}, "
          f"MRR@10 {val.details['mrr@10_before']:.3f} -> {val.details['mrr@10_after']:.3f}, drift {val.drift:.4f}")
    assert val.passed, val.reasons
    assert val.after - val.before >= 0.15
    assert val.details["mrr@10_after"] > val.details["mrr@10_before"]
    assert 0 < val.drift < 0.15
