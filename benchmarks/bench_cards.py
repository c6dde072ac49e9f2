"""Skill-card benchmarks, one run, each figure beside its peer:

(a) load of a small card (MiniLM query+value, 12 modules, rank 8: what training makes) and of
    rank-16 cards covering every linear layer of MiniLM (37) and of SmolLM2-135M (211):
    ``LoRAFormat.load`` (mmap, zero-copy, torch tensors out; verify on and off) vs
    ``safetensors.safe_open`` of the same tensors, every tensor read, with framework ``pt``
    (torch tensors out, the like-for-like peer) and ``np`` (NumPy arrays out). Goal (issue 13):
    ``verify=False`` no slower than safetensors, ``verify=True`` at most 2x;
(b) ``LoRAManager.apply_card`` / ``remove_card`` on MiniLM vs PEFT (``PeftModel.from_pretrained``,
    ``inject_adapter_in_model`` + ``set_peft_model_state_dict``, ``unload``);
(c) inference overhead of one applied, unmerged card vs the base model, PEFT beside it.

Every benchmark also checks its result. A comparison PNG goes to docs/img/cards_bench.png.

    python -m pytest benchmarks/bench_cards.py --benchmark-only -q \
        --benchmark-json /tmp/aios-sections/cards.json
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from aios_fast._atomic import save_figure
from aios_fast.cards import LoRAFormat
from aios_fast.lora import LoRALayer, LoRAManager
from aios_fast.lora.random import linear_shapes, random_card

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "docs" / "img" / "cards_bench.png"
SUMMARY = Path(os.environ.get("AIOS_CARDS_BENCH_SUMMARY", "/tmp/aios-sections/cards_summary.json"))
RANK = 16
TEXTS = [f"request {i}: how do skill cards move between nodes?" for i in range(4)]
PAIRED_ROUNDS = 30

RESULTS: dict[str, float] = {}  # benchmark name -> median seconds


def _record(benchmark, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS[name] = stats.stats.median


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    from aios_fast.bundled import minilm_dir

    return AutoModel.from_pretrained(minilm_dir()).eval()


@pytest.fixture(scope="module")
def batch():
    from transformers import AutoTokenizer

    from aios_fast.bundled import minilm_dir

    return AutoTokenizer.from_pretrained(minilm_dir())(TEXTS, padding=True, return_tensors="pt")


def _smollm2_shapes() -> dict[str, tuple[int, int]]:
    """SmolLM2-135M's linear shapes from its GGUF config, built on the meta device (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from aios_fast.bundled import smollm2_gguf

    path = smollm2_gguf()
    cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    return linear_shapes(skeleton)


@pytest.fixture(scope="module")
def card_files(tmp_path_factory, minilm):
    """name -> (card, .lora.arrow path, .safetensors path) for MiniLM and SmolLM2."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("cards")
    out = {}
    small = linear_shapes(minilm, r"attention\.self\.(query|value)$")
    for label, shapes, rank in (("minilm12", small, 8), ("minilm", linear_shapes(minilm), RANK),
                                ("smollm2", _smollm2_shapes(), RANK)):
        card = random_card(shapes, name=f"{label}-r{rank}", rank=rank, alpha=32, seed=1)
        arrow = LoRAFormat.save(card, d / f"{label}.lora.arrow")
        st = d / f"{label}.safetensors"
        tensors = {}
        for k in card.modules:
            tensors[f"{k}.lora_A.weight"] = card.weights_A[k]
            tensors[f"{k}.lora_B.weight"] = card.weights_B[k]
        save_file(tensors, st)
        out[label] = (card, arrow, st)
    assert len(out["minilm12"][0].modules) == 12
    assert len(out["minilm"][0].modules) == 37 and len(out["smollm2"][0].modules) == 211
    return out


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module: ratios to a JSON summary and the comparison PNG."""
    yield
    if not RESULTS:
        return
    ratios = {}
    for label in ("minilm12", "minilm", "smollm2"):
        for fw in ("pt", "np"):
            st = RESULTS.get(f"load-{label}-safetensors-{fw}")
            for v in ("verify", "noverify"):
                ours = RESULTS.get(f"load-{label}-arrow-{v}")
                if st and ours:
                    ratios[f"load {label} arrow({v})/safetensors({fw})"] = ours / st
    for op, ours, peers in (("apply", "apply-aios", ("apply-peft-from_pretrained", "apply-peft-inject")),
                            ("remove", "remove-aios", ("remove-peft-unload",))):
        for p in peers:
            if ours in RESULTS and p in RESULTS:
                ratios[f"{op} {p}/aios"] = RESULTS[p] / RESULTS[ours]
    base = RESULTS.get("infer-base")
    for k in ("infer-aios-unmerged", "infer-aios-merged", "infer-peft-unmerged"):
        if base and k in RESULTS:
            ratios[f"overhead (medians) {k}"] = RESULTS[k] / base - 1.0
    for k, v in RESULTS.items():
        if k.startswith("paired-overhead-"):
            ratios[k] = v
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps({"median_s": RESULTS, "ratios": ratios}, indent=2))
    _png(RESULTS)


def _png(res: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("load, rank-16 card (ms)", [k for k in res if k.startswith("load-")]),
        ("apply / remove on MiniLM (ms)", [k for k in res if k.startswith(("apply-", "remove-"))]),
        ("MiniLM forward, 4 sentences, 1 thread (ms)", [k for k in res if k.startswith("infer-")]),
        ("paired overhead vs base (%)", [k for k in res if k.startswith("paired-overhead-")]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(21, 5))
    for ax, (title, keys) in zip(axes, panels):
        scale = 1e2 if "%" in title else 1e3
        vals = [res[k] * scale for k in keys]
        colors = ["tab:blue" if ("aios" in k or "arrow" in k) else
                  ("tab:gray" if "base" in k else "tab:orange") for k in keys]
        ax.barh(keys, vals, color=colors)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
        ax.set_title(title)
        if "%" not in title and vals and max(vals) > 20 * max(min(vals), 1e-9):
            ax.set_xscale("log")  # spans orders of magnitude
        ax.invert_yaxis()
    fig.suptitle("aios-fast skill cards (blue) vs safetensors / PEFT (orange); median of one run, "
                 "2-core shared CPU VM")
    fig.tight_layout()
    save_figure(fig, PNG, dpi=110)


# --------------------------------------------------------------------------- (a) load
def _read_safetensors(path: Path, framework: str = "pt") -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework=framework) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("label", ["minilm12", "minilm", "smollm2"])
@pytest.mark.parametrize("verify", [pytest.param(True, id="verify"), pytest.param(False, id="noverify")])
def test_load_arrow(benchmark, card_files, label, verify):
    card, arrow, _ = card_files[label]
    benchmark.group = f"load-{label}"
    loaded = benchmark(LoRAFormat.load, arrow, verify=verify)
    assert loaded.equal(card)
    _record(benchmark, f"load-{label}-arrow-{'verify' if verify else 'noverify'}")


@pytest.mark.parametrize("label", ["minilm12", "minilm", "smollm2"])
@pytest.mark.parametrize("framework", ["pt", "np"])
def test_load_safetensors(benchmark, card_files, label, framework):
    card, _, st = card_files[label]
    benchmark.group = f"load-{label}"
    tensors = benchmark(_read_safetensors, st, framework)
    assert len(tensors) == 2 * len(card.modules)
    assert all(torch.equal(torch.as_tensor(tensors[f"{k}.lora_A.weight"]), card.weights_A[k]) and
               torch.equal(torch.as_tensor(tensors[f"{k}.lora_B.weight"]), card.weights_B[k])
               for k in card.modules)
    _record(benchmark, f"load-{label}-safetensors-{framework}")


# --------------------------------------------------------------------------- (b) apply / remove
@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, card_files):
    from aios_fast.interop.peft import to_peft

    return to_peft(card_files["minilm"][0], tmp_path_factory.mktemp("peft") / "adapter")


@pytest.fixture(scope="module")
def expected_out(minilm, batch, card_files):
    """MiniLM with W + scaling·B@A written into its weights: the reference output."""
    card = card_files["minilm"][0]
    ref = copy.deepcopy(minilm)
    with torch.no_grad():
        for k in card.modules:
            ref.get_submodule(k).weight += card.delta(k)
        return ref(**batch).last_hidden_state


def _out(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


def test_apply_aios(benchmark, minilm, batch, card_files, expected_out):
    card = card_files["minilm"][0]
    model = copy.deepcopy(minilm)
    mgr = LoRAManager(model)

    def clean():
        if mgr.list_cards():
            mgr.remove_card(card.name)

    benchmark.group = "apply-minilm"
    benchmark.pedantic(mgr.apply_card, args=(card,), setup=clean, rounds=30, iterations=1, warmup_rounds=2)
    torch.testing.assert_close(_out(model, batch), expected_out, atol=1e-5, rtol=0)
    _record(benchmark, "apply-aios")
    assert RESULTS.get("apply-aios", 0.0) < 0.5  # seed target: apply < 500 ms


def test_apply_peft_from_pretrained(benchmark, minilm, batch, peft_dir, expected_out):
    from peft import PeftModel

    holder = {}

    def fresh():
        return (copy.deepcopy(minilm),), {}

    def load(base):
        holder["m"] = PeftModel.from_pretrained(base, peft_dir)

    benchmark.group = "apply-minilm"
    benchmark.pedantic(load, setup=fresh, rounds=10, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(_out(holder["m"].eval(), batch), expected_out, atol=1e-5, rtol=0)
    _record(benchmark, "apply-peft-from_pretrained")


def test_apply_peft_inject(benchmark, minilm, batch, peft_dir, expected_out):
    """PEFT's low-level path with the adapter already in memory (like apply_card)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(peft_dir)
    sd = load_file(str(peft_dir / "adapter_model.safetensors"))
    sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    holder = {}

    def fresh():
        return (copy.deepcopy(minilm),), {}

    def inject(base):
        m = inject_adapter_in_model(cfg, base)
        res = set_peft_model_state_dict(m, sd)
        holder["m"], holder["res"] = m, res

    benchmark.group = "apply-minilm"
    benchmark.pedantic(inject, setup=fresh, rounds=10, iterations=1, warmup_rounds=1)
    assert not holder["res"].unexpected_keys
    torch.testing.assert_close(_out(holder["m"].eval(), batch), expected_out, atol=1e-5, rtol=0)
    _record(benchmark, "apply-peft-inject")


def test_remove_aios(benchmark, minilm, batch, card_files):
    card = card_files["minilm"][0]
    model = copy.deepcopy(minilm)
    base = _out(model, batch)
    mgr = LoRAManager(model)

    def applied():
        mgr.apply_card(card)

    benchmark.group = "remove-minilm"
    benchmark.pedantic(mgr.remove_card, args=(card.name,), setup=applied, rounds=30, iterations=1,
                       warmup_rounds=2)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert torch.equal(_out(model, batch), base)
    _record(benchmark, "remove-aios")
    assert RESULTS.get("remove-aios", 0.0) < 0.1  # seed target: remove < 100 ms


def test_remove_peft_unload(benchmark, minilm, batch, peft_dir):
    from peft import PeftModel

    base = _out(minilm, batch)
    holder = {}

    def applied():
        return (PeftModel.from_pretrained(copy.deepcopy(minilm), peft_dir),), {}

    def unload(pm):
        holder["m"] = pm.unload()

    benchmark.group = "remove-minilm"
    benchmark.pedantic(unload, setup=applied, rounds=10, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(_out(holder["m"], batch), base, atol=0, rtol=0)
    _record(benchmark, "remove-peft-unload")


# --------------------------------------------------------------------------- (c) inference
# One intra-op thread (benchmarks/conftest.py): on a shared 2-core VM this keeps the other
# tenants' load from swamping the few-percent difference being measured.
@pytest.fixture(scope="module")
def variants(minilm, card_files, peft_dir, one_thread):
    """label -> model: the base, our card unmerged / merged, PEFT's adapter unmerged."""
    from peft import PeftModel

    card = card_files["minilm"][0]
    out = {"base": minilm}
    for merged in (False, True):
        m = copy.deepcopy(minilm)
        mgr = LoRAManager(m)
        mgr.apply_card(card)
        if merged:
            mgr.merge()
        out["aios-merged" if merged else "aios-unmerged"] = m
    out["peft-unmerged"] = PeftModel.from_pretrained(copy.deepcopy(minilm), peft_dir).eval()
    return out


@pytest.mark.parametrize("label", ["base", "aios-unmerged", "aios-merged", "peft-unmerged"])
def test_infer(benchmark, variants, batch, expected_out, label):
    model = variants[label]
    benchmark.group = "infer-minilm"
    with torch.no_grad():
        out = benchmark.pedantic(lambda: model(**batch).last_hidden_state, rounds=15, iterations=3,
                                 warmup_rounds=2)
    if label == "base":
        assert (out - expected_out).abs().max() > 1e-2
    else:
        torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=0)
    _record(benchmark, f"infer-{label}")


@pytest.mark.parametrize("shape", ["4x12", "16x64"])
def test_infer_overhead_paired(benchmark, variants, batch, shape):
    """Overhead as the median over rounds of (variant time / base time) with the four models
    timed back to back in each round (order rotated), so load drift cancels out. Two request
    shapes (sentences x tokens): few tokens show per-op latency, more tokens approach the
    FLOP ratio r·(in+out)/(in·out) (5-8% at rank 16 on MiniLM)."""
    import time

    if shape == "16x64":
        ids = torch.randint(1000, 20000, (16, 64), generator=torch.Generator().manual_seed(0))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    reps, rounds = (3, PAIRED_ROUNDS) if shape == "4x12" else (1, 10)

    labels = list(variants)
    ratios: dict[str, list[float]] = {k: [] for k in labels if k != "base"}

    def one_round(r: int) -> None:
        t = {}
        for k in labels[r % len(labels):] + labels[:r % len(labels)]:
            s = time.perf_counter()
            for _ in range(reps):
                variants[k](**batch)
            t[k] = time.perf_counter() - s
        for k in ratios:
            ratios[k].append(t[k] / t["base"])

    benchmark.group = "infer-paired"
    with torch.no_grad():
        for r in range(2):  # warm-up
            one_round(r)
        ratios = {k: [] for k in ratios}
        benchmark.pedantic(one_round, args=(0,), rounds=1, iterations=1)  # keeps --benchmark-only
        for r in range(1, rounds):
            one_round(r)
    for k, v in ratios.items():
        v.sort()
        RESULTS[f"paired-overhead-{shape}-{k}"] = v[len(v) // 2] - 1.0
    assert abs(RESULTS[f"paired-overhead-{shape}-aios-merged"]) < 0.25  # merged costs ~nothing
