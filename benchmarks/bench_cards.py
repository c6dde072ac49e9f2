"""Skill-card benchmarks, one run, each figure beside its peer:

(a) load of a small card (MiniLM query+value, 12 modules, rank 8: what training makes) and of
    rank-16 cards covering every linear layer of MiniLM (37) and of SmolLM2-135M (211):
    ``LoRAFormat.load`` (mmap, zero-copy, torch tensors out; verify on and off) vs
    ``safetensors.safe_open`` of the same tensors, every tensor read, with framework ``pt``
    (torch tensors out, the like-for-like peer) and ``np`` (NumPy arrays out). Goal (issue 13):
    ``verify=False`` no slower than safetensors, ``verify=True`` at most 2x. Besides the
    pytest-benchmark medians, ``test_load_paired`` times ours and safetensors interleaved in
    each round and reports the median and quartiles of the per-round ratios (load drift on a
    shared machine hits both sides of a round alike);
(b) ``LoRAManager.apply_card`` / ``remove_card`` on MiniLM vs PEFT (``PeftModel.from_pretrained``,
    ``inject_adapter_in_model`` + ``set_peft_model_state_dict``, ``unload``);
(c) inference overhead of one applied, unmerged card vs the base model, PEFT beside it.

The cards, the load bodies and the checks are ``aios_fast.bench.cases.cards``, shared with
``aios-fast bench --only cards``; this file times them with pytest-benchmark. Every benchmark
also checks its result. A comparison PNG goes to docs/img/cards_bench.png.

    python -m pytest benchmarks/bench_cards.py --benchmark-only -q \
        --benchmark-json /tmp/aios-sections/cards.json
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from aios_fast._atomic import save_figure
from aios_fast.bench.cases import cards as case
from aios_fast.lora import LoRALayer, LoRAManager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
PNG = ROOT / "docs" / "img" / "cards_bench.png"
SUMMARY = Path(os.environ.get("AIOS_CARDS_BENCH_SUMMARY", "/tmp/aios-sections/cards_summary.json"))
RANK = case.RANK
TEXTS = case.TEXTS
PAIRED_ROUNDS = 30
LOAD_ROUNDS = max(2, int(os.environ.get("AIOS_BENCH_ROUNDS", "30")))  # interleaved rounds, test_load_paired

RESULTS: dict[str, float] = {}  # benchmark name -> median seconds
LOAD_RATIOS: dict[str, dict[str, float]] = {}  # paired load ratios: name -> median, quartiles


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


@pytest.fixture(scope="module")
def card_files(tmp_path_factory, minilm):
    """name -> (card, .lora.arrow path, .safetensors path) for the cards of ``case.LOAD_CARDS``."""
    out = case.load_cards(tmp_path_factory.mktemp("cards"), case.LOAD_CARDS, minilm)
    assert [len(out[k][0].modules) for k in ("minilm12", "minilm", "smollm2")] == [12, 37, 211]
    return out


@pytest.fixture(scope="module", autouse=True)
def report():
    """After the module: ratios to a JSON summary and the comparison PNG."""
    yield
    if not RESULTS and not LOAD_RATIOS:
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
    SUMMARY.write_text(json.dumps({"median_s": RESULTS, "ratios": ratios, "paired_load_ratios": LOAD_RATIOS,
                                   "load_average": os.getloadavg()}, indent=2))
    if RESULTS:  # pytest-benchmark timed something (not --benchmark-disable)
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
@pytest.mark.parametrize("label", list(case.LOAD_CARDS))
@pytest.mark.parametrize("verify", [pytest.param(True, id="verify"), pytest.param(False, id="noverify")])
def test_load_arrow(benchmark, card_files, label, verify):
    card, arrow, _ = card_files[label]
    benchmark.group = f"load-{label}"
    loaded = benchmark(case.load_card, arrow, verify)
    case.check_loaded(card, loaded)
    _record(benchmark, f"load-{label}-arrow-{'verify' if verify else 'noverify'}")


@pytest.mark.parametrize("label", list(case.LOAD_CARDS))
@pytest.mark.parametrize("framework", ["pt", "np"])
def test_load_safetensors(benchmark, card_files, label, framework):
    card, _, st = card_files[label]
    benchmark.group = f"load-{label}"
    tensors = benchmark(case.read_safetensors, st, framework)
    case.check_loaded(card, None, tensors)
    _record(benchmark, f"load-{label}-safetensors-{framework}")


@pytest.mark.parametrize("label", list(case.LOAD_CARDS))
def test_load_paired(benchmark, card_files, label):
    """Ours (verify off / on) and safetensors (pt / np) timed back to back in every round, the
    order rotated from round to round; each ratio is ours / safetensors within one round, so
    load from other processes hits both sides alike. A round times a batch of loads (a small
    card loads in well under a millisecond)."""
    card, arrow, st = card_files[label]
    bodies = {"noverify": lambda: case.load_card(arrow, False), "verify": lambda: case.load_card(arrow, True),
              "pt": lambda: case.read_safetensors(st, "pt"), "np": lambda: case.read_safetensors(st, "np")}
    case.check_loaded(card, bodies["verify"](), bodies["np"]())
    reps = max(1, round(2e-3 / _once(bodies["noverify"])))  # about 2 ms of our loads per side
    names = list(bodies)
    times: dict[str, list[float]] = {k: [] for k in names}

    def one_round(r: int) -> None:
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            for _ in range(reps):
                bodies[k]()
            times[k].append((time.perf_counter() - t) / reps)

    one_round(0)  # warm-up
    times = {k: [] for k in names}
    benchmark.group = "load-paired"
    benchmark.pedantic(one_round, args=(0,), rounds=1, iterations=1)  # keeps --benchmark-only
    for r in range(1, LOAD_ROUNDS):
        one_round(r)
    for ours in ("noverify", "verify"):
        for fw in ("pt", "np"):
            q = statistics.quantiles([o / p for o, p in zip(times[ours], times[fw])], n=4)
            LOAD_RATIOS[f"load {label} arrow({ours})/safetensors({fw})"] = {
                "median": q[1], "q1": q[0], "q3": q[2], "rounds": len(times[ours]), "loads_per_round": reps}
    assert LOAD_RATIOS[f"load {label} arrow(noverify)/safetensors(pt)"]["median"] > 0


def _once(fn) -> float:
    fn()
    t = time.perf_counter()
    fn()
    return max(time.perf_counter() - t, 1e-6)


# --------------------------------------------------------------------------- (b) apply / remove
@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, card_files):
    from aios_fast.interop.peft import to_peft

    return to_peft(card_files["minilm"][0], tmp_path_factory.mktemp("peft") / "adapter")


@pytest.fixture(scope="module")
def expected_out(minilm, batch, card_files):
    """MiniLM with W + scaling·B@A written into its weights: the reference output."""
    return case.expected_output(minilm, batch, card_files["minilm"][0])


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
    """PEFT's low-level path with the adapter already in memory (like apply_card); the case
    refuses a state dict PEFT does not take in full."""
    inject_peft = case.peft_inject(peft_dir)
    holder = {}

    def fresh():
        return (copy.deepcopy(minilm),), {}

    def inject(base):
        holder["m"] = inject_peft(base)

    benchmark.group = "apply-minilm"
    benchmark.pedantic(inject, setup=fresh, rounds=10, iterations=1, warmup_rounds=1)
    torch.testing.assert_close(_out(holder["m"], batch), expected_out, atol=1e-5, rtol=0)
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
