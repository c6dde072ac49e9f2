"""WeightMapProbe overhead and the token_norms kernel, in one run, on the bundled MiniLM.

The case bodies, fixtures and correctness checks are ``aios_fast.bench.cases.probe``, shared
with ``aios-fast bench --only probe``; this file times them with pytest-benchmark.

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

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from aios_fast._atomic import save_figure  # noqa: E402
from aios_fast.bench.cases import probe as case  # noqa: E402
from aios_fast.bench.core import timed  # noqa: E402

BATCH, SEQ = 64, 128
ROUNDS = int(os.environ.get("AIOS_BENCH_ROUNDS", "3"))
ROOT = Path(__file__).resolve().parents[1]
RESULTS: dict[str, float] = {}
PAIRED: dict[str, list[float]] = {}


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return case.load_model()


@pytest.fixture(scope="module")
def model(model_and_tokenizer):
    return model_and_tokenizer[0]


@pytest.fixture(scope="module")
def batch(model_and_tokenizer):
    return case.make_batch(model_and_tokenizer[1], BATCH, SEQ)


@pytest.fixture(scope="module")
def reference_output(model, batch):
    return case.forward(model, batch)


@pytest.fixture(scope="module")
def outputs(model, batch):
    return case.linear_outputs(model, batch)


def _record(name, benchmark):
    RESULTS[name] = benchmark.stats.stats.median


@pytest.mark.benchmark(group="probe-forward", timer=time.process_time)
def test_forward_plain(benchmark, model, batch, reference_output):
    out = benchmark.pedantic(case.forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
    case.check_same_output(out, reference_output)
    _record("forward_plain", benchmark)


@pytest.mark.benchmark(group="probe-forward", timer=time.process_time)
def test_forward_probe(benchmark, model, batch, reference_output, outputs):
    out, stats = benchmark.pedantic(case.probe_forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
    case.check_same_output(out, reference_output)  # hooks change nothing
    case.check_probe_stats(stats, outputs)
    _record("forward_probe", benchmark)


@pytest.mark.benchmark(group="probe-forward", timer=time.process_time)
def test_forward_naive_hooks(benchmark, model, batch, reference_output, outputs):
    out, norms = benchmark.pedantic(case.naive_forward, args=(model, batch), rounds=ROUNDS, warmup_rounds=1)
    case.check_same_output(out, reference_output)
    case.check_naive_norms(norms, outputs)
    _record("forward_naive", benchmark)


@pytest.mark.benchmark(group="probe-forward-paired")
def test_forward_paired(benchmark, model, batch, reference_output):
    """Alternate plain / probe / naive forwards so that load from other processes hits all three
    alike; the overhead is the median of per-round ratios, in wall and in process CPU time."""
    bodies = {"plain": lambda: case.forward(model, batch),
              "probe": lambda: case.probe_forward(model, batch)[0],
              "naive": lambda: case.naive_forward(model, batch)[0]}

    def one_round():
        wall, cpu = {}, {}
        for kind, body in bodies.items():
            c = time.process_time()
            wall[kind], out = timed(body)
            cpu[kind] = time.process_time() - c
            case.check_same_output(out, reference_output)
        for kind in ("probe", "naive"):
            PAIRED.setdefault(f"{kind}_wall", []).append(wall[kind] / wall["plain"])
            PAIRED.setdefault(f"{kind}_cpu", []).append(cpu[kind] / cpu["plain"])

    benchmark.pedantic(one_round, rounds=2 * ROUNDS, warmup_rounds=0)


def _skip_unavailable(impl):
    from aios_fast import backends

    ok, why = next(i for i in backends.implementations("token_norms", only_available=False)
                   if i.name == impl).available()
    if not ok:
        pytest.skip(f"{impl}: {why}")


@pytest.mark.benchmark(group="probe-kernel")
@pytest.mark.parametrize("impl", ["cpp", "numba", "torch"])
def test_kernel_all_module_outputs(benchmark, outputs, impl):
    _skip_unavailable(impl)
    states = benchmark.pedantic(case.all_stats, args=(outputs, impl), rounds=max(ROUNDS, 5), warmup_rounds=1)
    case.check_kernel_states(states, case.all_stats(outputs, "torch"))
    _record(f"kernel_{impl}", benchmark)


@pytest.mark.benchmark(group="probe-kernel")
@pytest.mark.parametrize("impl", ["cpp", "numba", "torch"])
def test_kernel_bf16_outputs(benchmark, outputs, impl):
    _skip_unavailable(impl)
    x = {n: outputs[n].to(torch.bfloat16) for n in (case.PROBE_MODULE, "encoder.layer.3.output.dense")}
    states = benchmark.pedantic(case.all_stats, args=(x, impl), rounds=max(ROUNDS, 5), warmup_rounds=1)
    case.check_kernel_states(states, case.all_stats(x, "torch"))
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
    for tag in ("", "bf16_"):  # numba: the portable path's standing against the reference
        if f"kernel_{tag}numba" in r and f"kernel_{tag}torch" in r:
            ratios[f"kernel_{tag}numba_speedup_vs_torch"] = r[f"kernel_{tag}torch"] / r[f"kernel_{tag}numba"]
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
