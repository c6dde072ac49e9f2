"""LoRAExtractor: scale-exact cards from deltas, rank modes, filters, heat-map budgets, PiSSA
factors, a planted delta in the bundled SmolLM2, the CLI on safetensors files, and a real
fine-tune of the bundled MiniLM recovered by a rank-16 card."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from aios_fast.errors import InputError
from aios_fast.extract import LoRAExtractor, allocate_budget
from aios_fast.linalg import truncated_svd

DATA = Path(__file__).parent / "data"


def lowrank(m, n, r, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g) / math.sqrt(r)


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    base = {
        "layers.0.attn.q_proj.weight": torch.randn(64, 48, generator=g),
        "layers.0.mlp.up_proj.weight": torch.randn(96, 48, generator=g),
        "layers.0.mlp.down_proj.weight": torch.randn(48, 96, generator=g),
        "embed_tokens.weight": torch.randn(100, 48, generator=g),
        "layers.0.norm.weight": torch.ones(48),
    }
    tuned = {k: v.clone() for k, v in base.items()}
    for i, k in enumerate(["layers.0.attn.q_proj.weight", "layers.0.mlp.up_proj.weight", "embed_tokens.weight"]):
        m, n = base[k].shape
        tuned[k] += lowrank(m, n, 6, 0.1, seed=i) + 1e-3 * torch.randn(m, n, generator=g)
    return tuned, base


@pytest.mark.parametrize("alpha", [1.0, 16.0, 64.0], ids=lambda a: f"alpha{a:g}")
@pytest.mark.parametrize("rank", [4, 8], ids=lambda r: f"r{r}")
def test_card_reproduces_the_truncated_delta_exactly(pair, alpha, rank):
    tuned, base = pair
    key = "layers.0.attn.q_proj"
    card = LoRAExtractor(rank=rank, alpha=alpha).extract_delta(tuned, base)
    U, S, Vh = truncated_svd((tuned[key + ".weight"], base[key + ".weight"]), rank)
    expected = (U * S) @ Vh
    assert card.module_rank(key) == rank and card.module_alpha(key) == alpha
    torch.testing.assert_close(card.delta(key), expected, rtol=0, atol=1e-5 * float(expected.abs().max()))
    # ... which is the optimal rank-r approximation (Eckart–Young) to LAPACK precision
    D = (tuned[key + ".weight"] - base[key + ".weight"]).double().numpy()
    u, s, vh = np.linalg.svd(D, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert np.linalg.norm(card.delta(key).double().numpy() - best) <= 1e-3 * np.linalg.norm(best)


def test_metadata_reports_energy_and_nuclear_fractions(pair):
    tuned, base = pair
    card = LoRAExtractor(rank=4).extract_delta(tuned, base)
    ev = json.loads(card.metadata["explained_variance"])
    for key in card.modules:
        D = (tuned[key + ".weight"] - base[key + ".weight"]).double().numpy()
        s = np.linalg.svd(D, compute_uv=False)
        assert ev[key]["energy"] == pytest.approx((s[:4] ** 2).sum() / (s ** 2).sum(), rel=1e-4)
        assert ev[key]["nuclear"] == pytest.approx(s[:4].sum() / s.sum(), rel=1e-4)
        assert ev[key]["nuclear_exact"] is True
    assert 0 < float(card.metadata["energy_fraction"]) < 1


def test_nuclear_fraction_of_a_large_module_is_a_lower_bound():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(600, 500, generator=g)
    D = lowrank(600, 500, 5, 1.0, seed=3) + 0.01 * torch.randn(600, 500, generator=g)
    card = LoRAExtractor(rank=5).extract_delta(base + D, base, module="big")
    ev = json.loads(card.metadata["explained_variance"])["big"]
    s = np.linalg.svd(D.double().numpy(), compute_uv=False)
    assert ev["nuclear_exact"] is False
    true = s[:5].sum() / s.sum()
    assert 0.9 * true <= ev["nuclear"] <= true + 1e-6
    assert ev["energy"] == pytest.approx((s[:5] ** 2).sum() / (s ** 2).sum(), rel=1e-4)


def test_embeddings_and_unchanged_modules_are_skipped_by_default(pair):
    tuned, base = pair
    card = LoRAExtractor(rank=4).extract_delta(tuned, base)
    assert card.modules == ["layers.0.attn.q_proj", "layers.0.mlp.up_proj"]  # down_proj unchanged, 1-D norm ignored
    with_emb = LoRAExtractor(rank=4, include_embeddings=True).extract_delta(tuned, base)
    assert "embed_tokens" in with_emb.modules


def test_include_exclude_regexes(pair):
    tuned, base = pair
    assert LoRAExtractor(rank=2).extract_delta(tuned, base, include=r"mlp").modules == ["layers.0.mlp.up_proj"]
    assert LoRAExtractor(rank=2).extract_delta(tuned, base, exclude=r"mlp").modules == ["layers.0.attn.q_proj"]
    with pytest.raises(InputError, match="no module left"):
        LoRAExtractor(rank=2).extract_delta(tuned, base, include="nothing-matches")
    with pytest.raises(InputError, match="include='\\(' is not a valid regular expression"):
        LoRAExtractor(rank=2).extract_delta(tuned, base, include="(")


@pytest.mark.parametrize("mode,value", [("energy", 0.999), ("sv_ratio", 0.05), ("epsilon", 0.05)])
def test_adaptive_rank_modes_find_the_planted_rank(pair, mode, value):
    tuned, base = pair
    card = LoRAExtractor(rank=2).extract_delta(tuned, base, **{mode: value}, max_rank=20)
    for key in card.modules:
        assert card.module_rank(key) == 6, f"{mode}: {key} rank {card.module_rank(key)}"
    with pytest.raises(InputError, match="at most one"):
        LoRAExtractor().extract_delta(tuned, base, rank=2, energy=0.9)


def test_low_variance_modules_are_flagged_or_dropped(pair):
    tuned, base = pair
    flag = LoRAExtractor(rank=1, min_explained_variance=0.5).extract_delta(tuned, base)
    assert set(flag.metadata["low_variance_modules"].split(",")) == set(flag.modules)
    keep = LoRAExtractor(rank=6, min_explained_variance=0.5, on_low_variance="drop").extract_delta(tuned, base)
    assert len(keep.modules) == 2 and "low_variance_modules" not in keep.metadata
    with pytest.raises(InputError, match="every module was dropped"):
        LoRAExtractor(rank=1, min_explained_variance=0.9, on_low_variance="drop").extract_delta(tuned, base)


def test_two_tensors_identical_inputs_and_bad_configs():
    W = torch.randn(30, 20)
    D = lowrank(30, 20, 3)
    card = LoRAExtractor(rank=3).extract_delta(W + D, W, module="proj")
    assert card.modules == ["proj"]
    torch.testing.assert_close(card.delta("proj"), D, atol=1e-4, rtol=0)
    with pytest.raises(InputError, match="identical"):
        LoRAExtractor(rank=3).extract_delta({"a.weight": W}, {"a.weight": W.clone()})
    with pytest.raises(InputError, match="not a mix"):
        LoRAExtractor(rank=3).extract_delta(W, {"a.weight": W})
    for bad in (dict(rank=0), dict(alpha=-1.0), dict(on_low_variance="warn"), dict(min_explained_variance=2.0)):
        with pytest.raises(InputError):
            LoRAExtractor(**bad)


def test_workers_give_the_same_card(pair):
    tuned, base = pair
    a = LoRAExtractor(rank=4).extract_delta(tuned, base)
    b = LoRAExtractor(rank=4, workers=2).extract_delta(tuned, base)
    for k in a.modules:
        torch.testing.assert_close(a.delta(k), b.delta(k))


def test_principal_factors_of_a_weight_pissa():
    W = lowrank(80, 60, 10) + 0.01 * torch.randn(80, 60)
    A, B, ev = LoRAExtractor(rank=10).extract(W)
    assert A.shape == (10, 60) and B.shape == (80, 10)
    s = np.linalg.svd(W.double().numpy(), compute_uv=False)
    assert ev == pytest.approx((s[:10] ** 2).sum() / (s ** 2).sum(), rel=1e-5)
    torch.testing.assert_close(A @ A.T, B.T @ B, atol=1e-3, rtol=1e-3)  # √S split evenly
    assert float(torch.linalg.norm(W - B @ A)) <= 1.001 * math.sqrt((s[10:] ** 2).sum())


def test_allocate_budget_follows_heat():
    scores = {"a": 3.0, "b": 1.0, "c": 0.5, "d": 0.01}
    caps = {"a": 64, "b": 64, "c": 64, "d": 64}
    r = allocate_budget(scores, 24, caps)
    assert sum(r.values()) == 24 and list(r) == ["a", "b", "c", "d"][:len(r)]
    assert r["a"] > r["b"] > r["c"]
    tight = allocate_budget(scores, 24, {"a": 4, "b": 64, "c": 64, "d": 64})
    assert tight["a"] == 4 and sum(tight.values()) == 24


def test_extract_from_heat_map_spends_the_budget_on_hot_modules(pair):
    from aios_fast.probe import HeatMap

    tuned, base = pair
    mods = ["layers.0.attn.q_proj", "layers.0.mlp.up_proj"]
    stats = {m: {"count": 10.0, "sum": s, "sumsq": s * s, "max": s, "mean_norm": s, "raw_l2": s, "std_norm": 0.1}
             for m, s in zip(mods, (9.0, 3.0))}
    hm = HeatMap(modules=mods, stats=stats, channel_energy={m: np.ones(4, np.float32) for m in mods})
    card = LoRAExtractor(alpha=8.0).extract_from_heat_map(tuned, base, hm, rank_budget=8, score="mean_norm")
    ranks = {k: card.module_rank(k) for k in card.modules}
    assert sum(ranks.values()) == 8 and ranks["layers.0.attn.q_proj"] == 6 and ranks["layers.0.mlp.up_proj"] == 2
    assert card.metadata["heat_map_budget"] == "8"


def test_smollm2_planted_delta_is_recovered(smollm2_gguf):
    """Planted rank-4 deltas plus Gaussian noise on four SmolLM2 modules; everything else
    identical. Stated error: ‖ΔW_card − L‖_F ≤ 2·√(2k)·‖N‖₂ (Eckart–Young + Weyl: the rank-k
    truncation of L + N is within 2‖N‖₂ of L in spectral norm and the difference has rank ≤ 2k)."""
    from aios_fast.engines import load_state_dict

    base = load_state_dict(smollm2_gguf)  # the engines' GGUF reader: dequantised, HF names
    tuned = dict(base)
    g = torch.Generator().manual_seed(4)
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.7.self_attn.v_proj",
               "model.layers.15.mlp.down_proj", "model.layers.29.mlp.up_proj"]
    planted, noise = {}, {}
    for i, key in enumerate(targets):
        W = base[key + ".weight"]
        m, n = W.shape
        L = lowrank(m, n, 4, 0.05 * float(W.std()) * math.sqrt(min(m, n)), seed=10 + i)
        N = 1e-3 * float(W.std()) * torch.randn(m, n, generator=g)
        tuned[key + ".weight"] = W + L + N
        planted[key], noise[key] = L, N
    card = LoRAExtractor(rank=4, alpha=8.0).extract_delta(tuned, base)
    assert card.modules == sorted(targets)
    for key in targets:
        L, N = planted[key], noise[key]
        err = float(torch.linalg.norm(card.delta(key) - L))
        bound = 2 * math.sqrt(8) * float(torch.linalg.matrix_norm(N, ord=2))
        rel = err / float(torch.linalg.norm(L))
        assert err <= bound, f"{key}: error {err:.3e} above the stated bound {bound:.3e}"
        assert rel < 0.02, f"{key}: relative error {rel:.4f}"


def test_cli_end_to_end_on_safetensors(tmp_path, minilm_dir):
    from safetensors.torch import load_file, save_file

    from aios_fast.cards import LoRAFormat
    from aios_fast.cli import main

    base = load_file(str(minilm_dir / "model.safetensors"))
    tuned = {k: v.clone() for k, v in base.items()}
    keys = ["encoder.layer.0.attention.self.query", "encoder.layer.3.intermediate.dense",
            "encoder.layer.5.output.dense"]
    for i, k in enumerate(keys):
        m, n = tuned[k + ".weight"].shape
        tuned[k + ".weight"] += lowrank(m, n, 8, 0.05, seed=i)
    tuned["embeddings.word_embeddings.weight"] += 0.01  # skipped by default
    save_file(base, str(tmp_path / "base.safetensors"))
    # tuned as a sharded checkpoint with an index, as transformers writes big models
    names = sorted(tuned)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    tdir = tmp_path / "tuned"
    tdir.mkdir()
    for fname, ks in shards.items():
        save_file({k: tuned[k].contiguous() for k in ks}, str(tdir / fname))
    (tdir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    out, summary = tmp_path / "skill.lora.arrow", tmp_path / "summary.json"
    rc = main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned", str(tdir), "--rank", "8",
               "--out", str(out), "--summary", str(summary), "--no-progress"])
    assert rc == 0
    card = LoRAFormat.load(out)
    assert card.modules == sorted(keys) and card.rank == 8 and card.alpha == 16.0
    for i, k in enumerate(keys):
        m, n = base[k + ".weight"].shape
        torch.testing.assert_close(card.delta(k), lowrank(m, n, 8, 0.05, seed=i), atol=1e-4, rtol=1e-3)
    s = json.loads(summary.read_text())
    assert s["modules"] == 3 and s["energy_fraction"] > 0.999
    per = {r["module"]: r for r in s["per_module"]}
    assert all(per[k]["rank"] == 8 and per[k]["seconds"] >= 0 for k in keys)
    assert sum(r["status"] == "unchanged" for r in s["per_module"]) > 30
    # energy mode and a bad combination
    rc = main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned", str(tdir), "--energy", "0.99",
               "--out", str(tmp_path / "e.lora.arrow"), "--no-progress", "--json"])
    assert rc == 0 and LoRAFormat.load(tmp_path / "e.lora.arrow").rank == 8
    assert main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned", str(tdir),
                 "--budget", "4", "--out", str(tmp_path / "x.lora.arrow")]) == 1
    # the subspace-iteration algorithm recovers the same planted deltas
    rc = main(["extract", "--base", str(tmp_path / "base.safetensors"), "--tuned", str(tdir), "--rank", "8",
               "--svd-method", "subspace", "--oversample", "10", "--out", str(tmp_path / "s.lora.arrow"),
               "--no-progress"])
    assert rc == 0
    sub = LoRAFormat.load(tmp_path / "s.lora.arrow")
    for i, k in enumerate(keys):
        m, n = base[k + ".weight"].shape
        torch.testing.assert_close(sub.delta(k), lowrank(m, n, 8, 0.05, seed=i), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------- real fine-tune (slow)
QA = DATA / "qa"


def _qa(name):
    return [json.loads(line) for line in (QA / name).read_text().splitlines() if line.strip()]


def _encode(model, tok, texts):
    b = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    out = model(**b).last_hidden_state
    mask = b["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)


class _View:
    """The minimal EngineView that aios_fast.learn.retrieval_metrics needs: encode(texts)."""

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def encode(self, texts):
        return _encode(self.model, self.tok, list(texts))


@torch.no_grad()
def _heldout(model, tok, pairs, distractors):
    """Held-out Ferrowind questions (never trained on) retrieving their answers among the 15
    held-out answers plus the 45 training answers: recall@1 (aios_fast.learn's gate metric)
    and, as a continuous companion, the InfoNCE loss over the same 60 candidates (scale 20)."""
    from aios_fast.learn.gate import retrieval_metrics

    r1 = retrieval_metrics(_View(model, tok), pairs, distractors=distractors)["recall@1"]
    q = _encode(model, tok, [p[0] for p in pairs])
    a = _encode(model, tok, [p[1] for p in pairs] + list(distractors))
    return r1, float(torch.nn.functional.cross_entropy(q @ a.T * 20.0, torch.arange(len(pairs))))


@pytest.mark.slow
def test_rank16_card_recovers_a_real_minilm_finetune(hf_minilm, minilm_tokenizer, one_thread):
    """Fully fine-tune MiniLM's 36 linear weight matrices (AdamW, lr 1.5e-4 decaying linearly
    to 0, no weight decay, batch 16 with in-batch negatives, scale 20, mean pooling, 8 epochs =
    16 steps, seed 0) on
    the 45 Ferrowind training pairs (tests/data/qa: an invented storage appliance's jargon, so
    the gain is domain knowledge the base lacks). Held out: 15 other Ferrowind questions,
    retrieved among their answers plus the 45 training answers. Extract a rank-16 card of the
    delta, apply it to a copy of the base through LoRAManager: it must recover ≥ 90% of the
    fine-tune's held-out recall@1 gain (gain ≥ 0.15, i.e. ≥ 3 of 15 queries) and ≥ 90% of
    its held-out InfoNCE loss reduction.

    Measured here: recall@1 0.533 → 0.867 (tuned) → 0.867 (card), 100%; loss 1.579 → 0.583
    → 0.655, 93%; the card keeps only ~51% of ‖ΔW‖²_F (Adam's update is high-rank, much of it
    functionally idle). Coarse: 15 queries and a 5-query gain, so 90% means the card must match
    the tuned model's recall@1. Seeds 0-5 of this recipe: recall@1 recovery 100, 150, 86, 125,
    100, 125%; loss recovery 93, 95, 91, 89, 94, 90% — seed 0 is typical, not cherry-picked,
    but one seed in three misses one of the two bars by a hair. A constant lr 1e-4 misses the
    recall@1 bar by one query on seeds 3-5; longer or gentler fine-tunes (80-150 steps at
    batch 8, lr 1e-5-3e-5) generalise no better and compress worse (loss recovery ~85%)."""
    from aios_fast.lora import LoRAManager

    train, heldout = _qa("ferrowind_train.jsonl"), _qa("ferrowind_heldout.jsonl")
    pairs = [(r["query"], r["answer"]) for r in heldout]
    distractors = [r["answer"] for r in train]
    tok = minilm_tokenizer
    base = hf_minilm
    torch.manual_seed(0)
    tuned = copy.deepcopy(base).train()
    for name, p in tuned.named_parameters():
        # a card carries only Linear deltas: biases, LayerNorms and embeddings stay at the
        # base so the test measures extraction, not what a LoRA card cannot carry; the
        # pooler is not on the mean-pooled path.
        p.requires_grad_(name.endswith(".weight") and "LayerNorm" not in name
                         and "embeddings" not in name and "pooler" not in name)
    params = [p for p in tuned.parameters() if p.requires_grad]
    assert len(params) == 36
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    steps, total = 0, EPOCHS * (len(train) // BATCH)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train) - BATCH + 1, BATCH):
            idx = perm[i:i + BATCH]
            q = _encode(tuned, tok, [train[j]["query"] for j in idx])
            a = _encode(tuned, tok, [train[j]["answer"] for j in idx])
            loss = torch.nn.functional.cross_entropy(q @ a.T * 20.0, torch.arange(len(idx)))
            for group in opt.param_groups:  # linear decay to 0
                group["lr"] = LR * (1 - steps / total)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    tuned.eval()
    (r_base, l_base) = _heldout(base, tok, pairs, distractors)
    (r_tuned, l_tuned) = _heldout(tuned, tok, pairs, distractors)
    assert r_tuned - r_base >= 0.15 and l_tuned < l_base, \
        f"fine-tune did not generalise: recall@1 {r_base} -> {r_tuned}, loss {l_base} -> {l_tuned}"
    card = LoRAExtractor(rank=16, alpha=16).extract_delta(tuned.state_dict(), base.state_dict(),
                                                          name="ferrowind")
    assert len(card.modules) == 36 and card.rank == 16
    model = copy.deepcopy(base)
    LoRAManager(model).apply_card(card)
    r_card, l_card = _heldout(model, tok, pairs, distractors)
    rec_r1 = (r_card - r_base) / (r_tuned - r_base)
    rec_loss = (l_base - l_card) / (l_base - l_tuned)
    print(f"\n{steps} full fine-tune steps; held-out recall@1: base {r_base:.3f}, tuned {r_tuned:.3f}, "
          f"rank-16 card {r_card:.3f} ({rec_r1:.1%} of the gain); held-out loss: base {l_base:.3f}, "
          f"tuned {l_tuned:.3f}, card {l_card:.3f} ({rec_loss:.1%} of the gain); "
          f"energy kept {card.metadata['energy_fraction']}")
    assert rec_r1 >= 0.9, f"card recovers {rec_r1:.1%} of the held-out recall@1 gain"
    assert rec_loss >= 0.9, f"card recovers {rec_loss:.1%} of the held-out loss reduction"


EPOCHS, BATCH, LR = 8, 16, 1.5e-4


def test_extract_cli_offers_exactly_the_svd_methods_truncated_svd_knows():
    import argparse

    from aios_fast.cli.extract import register
    from aios_fast.linalg import SVD_METHODS

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    action = next(a for a in sub.choices["extract"]._actions if a.dest == "svd_method")
    assert tuple(action.choices) == SVD_METHODS


def test_extractor_rejects_an_unknown_svd_method():
    with pytest.raises(InputError, match="svd_method must be one of 'krylov', 'subspace', got 'lanczos'"):
        LoRAExtractor(svd_method="lanczos")
