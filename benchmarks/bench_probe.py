"""WeightMapProbe overhead and the token_norms kernel, in one run, on the bundled MiniLM.

Batch 64 x 128 real tokens (sentences of the built-in corpora packed to 128 tokens):

* ``forward``: plain forward, the probe's hooks, the seed's naive hooks (``torch.norm(out).item()``
  per module), timed in process CPU seconds (all threads): on a machine shared with other
  jobs the wall time of the same forward varies 2x, its CPU time by a few percent. Plus a
  paired run alternating the three, with wall and CPU ratios per round.
* ``kernel``: the token_norms statistics of all 37 Linear outputs of one forward, with the
  dispatched kernel (cpp) and with the torch reference ops.

Every benchmark checks its result. The module teardown prints the ratios, writes them to
``/tmp/aios-sections/probe_ratios.json`` and draws ``docs/img/probe_bench.png``.

Run: ``python -m pytest benchmarks/bench_probe.py --benchmark-only -q --benchmark-json /tmp/aios-sections/probe.json``
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from aios_fast._atomic import save_figure  # noqa: E402
from aios_fast.kernels.norms import NormState, token_norm_stats  # noqa: E402
from aios_fast.probe import WeightMapProbe, corpus  # noqa: E402

BATCH, SEQ = 64, 128
ROUNDS = int(os.environ.get("AIOS_BENCH_ROUNDS", "3"))
ROOT = Path(__file__).resolve().parents[1]
RESULTS: dict[str, float] = {}
PAIRED: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModel

    from aios_fast.bundled import minilm_dir

    return AutoModel.from_pretrained(minilm_dir()).eval()


@pytest.fixture(scope="module")
def batch():
    """64 rows of 128 real tokens: corpus sentences packed until the row is full."""
    from transformers import AutoTokenizer

    from aios_fast.bundled import minilm_dir

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    sents = corpus("code") + corpus("cooking") + corpus("general")
    ids = [t for s in sents for t in tok(s, add_special_tokens=False)["input_ids"]]
    rows = []
    for r in range(BATCH):
        start = (r * 97) % (len(ids) - SEQ)
        rows.append([tok.cls_token_id] + ids[start:start + SEQ - 2] + [tok.sep_token_id])
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


@pytest.fixture(scope="module")
def reference_output(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


@pytest.fixture(scope="module")
def outputs(model, batch):
    """Every Linear output of one forward, flattened to (tokens, features)."""
    got = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: got.__setitem__(n, o.detach().reshape(-1, o.shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for h in hooks:
            h.remove()
    return got


def _record(name, benchmark):
    RESULTS[name] = benchmark.stats.stats.median


def _forward(model, batch):
    with torch.no_grad():
        return model(**batch).last_hidden_state


class NaiveHooks:
    """The seed's scoring: one torch.norm(out).item() per hooked module per forward."""

    def __init__(self, model):
        self.norms: dict[str, list[float]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)]

    def _hook(self, name):
        def hook(mod, inp, out):
            self.norms.setdefault(name, []).append(torch.norm(out).item())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.benchmark(group="probe-forward", timer=time.process_time)
def test_forward_plain(benchmark, model, batch, reference_output):
    out = benchmark.pedantic(_forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
    assert torch.equal(out, reference_output)
    _record("forward_plain", benchmark)


@pytest.mark.benchmark(group="probe-forward", timer=time.process_time)
def test_forward_probe(benchmark, model, batch, reference_output, outputs):
    p = WeightMapProbe(model).attach()
    try:
        out = benchmark.pedantic(_forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
        calls = ROUNDS + 1
        stats = p.statistics()
    finally:
        p.detach()
    assert torch.equal(out, reference_output)  # hooks change nothing
    x = outputs["encoder.layer.3.intermediate.dense"].double()
    s = stats["encoder.layer.3.intermediate.dense"]
    assert s["count"] == calls * BATCH * SEQ
    assert s["mean_norm"] == pytest.approx(x.norm(dim=1).mean().item(), rel=1e-5)
    _record("forward_probe", benchmark)


@pytest.mark.benchmark(group="probe-forward", timer=time.process_time)
def test_forward_naive_hooks(benchmark, model, batch, reference_output, outputs):
    naive = NaiveHooks(model)
    try:
        out = benchmark.pedantic(_forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
    finally:
        naive.remove()
    assert torch.equal(out, reference_output)
    n = "encoder.layer.3.intermediate.dense"
    # torch.norm sums 12.6M squares in float32: about 1e-4 off the float64 value
    assert naive.norms[n][-1] == pytest.approx(outputs[n].double().norm().item(), rel=2e-3)
    _record("forward_naive", benchmark)


@pytest.mark.benchmark(group="probe-forward-paired")
def test_forward_paired(benchmark, model, batch, reference_output):
    """Alternate plain / probe / naive forwards so that load from other processes hits all three
    alike; the overhead is the median of per-round ratios, in wall and in process CPU time."""

    def one_round():
        wall, cpu = {}, {}
        for kind in ("plain", "probe", "naive"):
            p = WeightMapProbe(model).attach() if kind == "probe" else None
            h = NaiveHooks(model) if kind == "naive" else None
            t, c = time.perf_counter(), time.process_time()
            out = _forward(model, batch)
            wall[kind], cpu[kind] = time.perf_counter() - t, time.process_time() - c
            if p is not None:
                p.detach()
            if h is not None:
                h.remove()
            assert torch.equal(out, reference_output)
        for kind in ("probe", "naive"):
            PAIRED.setdefault(f"{kind}_wall", []).append(wall[kind] / wall["plain"])
            PAIRED.setdefault(f"{kind}_cpu", []).append(cpu[kind] / cpu["plain"])

    benchmark.pedantic(one_round, rounds=2 * ROUNDS, warmup_rounds=0)


def _all_stats(outputs, impl):
    states = {n: NormState.empty(x.shape[1]) for n, x in outputs.items()}
    for n, x in outputs.items():
        token_norm_stats(x, states[n], force=impl)
    return states


@pytest.mark.benchmark(group="probe-kernel")
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_kernel_all_module_outputs(benchmark, outputs, impl):
    states = benchmark.pedantic(_all_stats, args=(outputs, impl), rounds=max(ROUNDS, 5), warmup_rounds=1)
    ref = _all_stats(outputs, "torch") if impl != "torch" else states
    for n in outputs:
        a, b = states[n].to_dict(), ref[n].to_dict()
        for k in ("count", "sum", "sumsq", "max"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (n, k)
        # float32 column sums over 8192 rows in different orders
        np.testing.assert_allclose(states[n].channel_numpy(), ref[n].channel_numpy(), rtol=1e-4)
    _record(f"kernel_{impl}", benchmark)


@pytest.mark.benchmark(group="probe-kernel")
@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_kernel_bf16_outputs(benchmark, outputs, impl):
    x = {n: outputs[n].to(torch.bfloat16) for n in ("encoder.layer.3.intermediate.dense",
                                                    "encoder.layer.3.output.dense")}
    states = benchmark.pedantic(_all_stats, args=(x, impl), rounds=max(ROUNDS, 5), warmup_rounds=1)
    ref = _all_stats(x, "torch")
    for n in x:
        assert states[n].to_dict()["sum"] == pytest.approx(ref[n].to_dict()["sum"], rel=1e-5)
    _record(f"kernel_bf16_{impl}", benchmark)


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    if not {"forward_plain", "forward_probe", "forward_naive"} <= RESULTS.keys():
        return
    r = dict(RESULTS)
    ratios = {  # forward group: process CPU seconds (all threads), see module docstring
        "probe_overhead_pct_cpu": 100 * (r["forward_probe"] / r["forward_plain"] - 1),
        "naive_overhead_pct_cpu": 100 * (r["forward_naive"] / r["forward_plain"] - 1),
    }
    if PAIRED:
        for key, vals in PAIRED.items():
            ratios[f"{key.replace('_', '_overhead_pct_paired_')}"] = 100 * (statistics.median(vals) - 1)
    if "kernel_cpp" in r and "kernel_torch" in r:
        ratios["kernel_speedup_vs_torch"] = r["kernel_torch"] / r["kernel_cpp"]
        # what the kernels cost inside one forward, measured alone (no noise from the GEMMs)
        ratios["kernel_share_of_forward_pct"] = 100 * r["kernel_cpp"] / r["forward_plain"]
    if "kernel_bf16_cpp" in r and "kernel_bf16_torch" in r:
        ratios["kernel_bf16_speedup_vs_torch"] = r["kernel_bf16_torch"] / r["kernel_bf16_cpp"]
    summary = {"median_seconds": r, "ratios": ratios, "batch": [BATCH, SEQ], "rounds": ROUNDS,
               "torch_threads": torch.get_num_threads()}
    print("\n" + json.dumps(summary, indent=2))
    out = Path("/tmp/aios-sections")
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_ratios.json").write_text(json.dumps(summary, indent=2))
    _plot(r, ratios, ROOT / "docs" / "img" / "probe_bench.png")


def _plot(r, ratios, path):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = ["plain", "probe\n(token_norms)", "seed hooks\n(norm().item())"]
    vals = [r["forward_plain"], r["forward_probe"], r["forward_naive"]]
    bars = a1.bar(labels, vals, color=["tab:gray", "tab:green", "tab:red"])
    for b, v in zip(bars, vals):
        a1.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}s", ha="center", va="bottom", fontsize=8)
    a1.set_ylabel("process CPU seconds (median)")
    a1.set_title(f"MiniLM forward, batch {BATCH}x{SEQ}, CPU", fontsize=9)
    if "kernel_cpp" in r:
        kl = ["cpp fp32", "torch fp32"] + (["cpp bf16", "torch bf16"] if "kernel_bf16_cpp" in r else [])
        kv = [r["kernel_cpp"], r["kernel_torch"]] + (
            [r["kernel_bf16_cpp"], r["kernel_bf16_torch"]] if "kernel_bf16_cpp" in r else [])
        bars = a2.bar(kl, [1e3 * v for v in kv], color=["tab:green", "tab:gray"] * 2)
        for b, v in zip(bars, kv):
            a2.text(b.get_x() + b.get_width() / 2, 1e3 * v, f"{1e3 * v:.1f}", ha="center", va="bottom", fontsize=8)
        a2.set_ylabel("milliseconds (median)")
        a2.set_title(f"token_norms stats: all 37 outputs (fp32), 2 outputs (bf16); "
                     f"{ratios['kernel_speedup_vs_torch']:.1f}x", fontsize=9)
    fig.suptitle("2-core shared CPU VM, no GPU (noisy); probe overhead "
                 f"{ratios['probe_overhead_pct_cpu']:+.1f}% CPU time, "
                 f"{ratios.get('probe_overhead_pct_paired_cpu', float('nan')):+.1f}% paired CPU median",
                 fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    assert math.isfinite(ratios["probe_overhead_pct_cpu"])
