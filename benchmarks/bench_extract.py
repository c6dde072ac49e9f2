"""Whole-model extraction: `aios-fast extract` against `mergekit-extract-lora`, same pair, same rank.

The case is ``aios_fast.bench.cases.extract`` (shared with ``aios-fast bench --only extract``):
Llama-shaped bf16 safetensors pairs generated once and cached (``aios_fast.bench.cases.pairs``),
both tools run as subprocesses on the CPU at rank 16, embeddings and lm_head excluded, each
through a driver that reports the time after its imports as well as the end-to-end time. Both
outputs are checked against tuned − base on a sample of modules (relative error < 5 %).

Pairs: ``AIOS_BENCH_PAIRS`` (comma-separated, default ``smollm2-135m``; ``llama-1b`` is the
1B-parameter-shaped pair where compute dominates, ``tiny`` a smoke size). mergekit lives in its
own virtual environment so it cannot disturb this one's packages (see ``find_mergekit``):

    python -m venv .venv-mergekit
    .venv-mergekit/bin/pip install torch==2.13.0 mergekit

(``.ci/setup`` builds the same environment reusing .venv's torch through a ``.pth`` file). The mergekit benchmark skips with that reason when it is absent (or set ``MERGEKIT_EXTRACT_LORA``).

Run: ``python -m pytest benchmarks/bench_extract.py --benchmark-only -q -s``
"""

from __future__ import annotations

import os
import shutil

import pytest

from aios_fast.bench.cases import extract as case
from aios_fast.bench.cases.pairs import SHAPES, ensure_pair

RANK = 16
PAIRS = [p.strip() for p in os.environ.get("AIOS_BENCH_PAIRS", "smollm2-135m").split(",") if p.strip()]
TIMES: dict[tuple[str, str], tuple[float, float]] = {}


@pytest.fixture(scope="module", params=PAIRS)
def pair(request):
    return request.param, ensure_pair(request.param)


def test_aios_fast_extract(benchmark, pair, tmp_path):
    name, d = pair
    out = tmp_path / "ours.lora.arrow"
    benchmark.group = f"whole-model extraction, {SHAPES[name].label}, rank {RANK}"
    benchmark.pedantic(lambda: TIMES.__setitem__((name, "ours"), case.run_tool(case.ours_command(d, out, RANK))),
                       rounds=1, iterations=1)
    case.check_card(out, d, name)
    wall, after = TIMES[(name, "ours")]
    benchmark.extra_info.update({"seconds": wall, "after_startup_seconds": after})


def test_mergekit_extract_lora(benchmark, pair, tmp_path):
    python, version = case.find_mergekit()
    if python is None:
        pytest.skip(version)
    name, d = pair
    out = tmp_path / "mergekit"
    shutil.rmtree(out, ignore_errors=True)
    benchmark.group = f"whole-model extraction, {SHAPES[name].label}, rank {RANK}"
    benchmark.pedantic(lambda: TIMES.__setitem__(
        (name, "mergekit"), case.run_tool(case.mergekit_command(python, d, out, RANK), env=case._clean_env())),
        rounds=1, iterations=1)
    case.check_mergekit(out, d, name)
    wall, after = TIMES[(name, "mergekit")]
    benchmark.extra_info.update({"seconds": wall, "after_startup_seconds": after, "mergekit": version})
    if (name, "ours") in TIMES:
        ow, oa = TIMES[(name, "ours")]
        print(f"\n{name}: mergekit {wall:.1f} s ({after:.1f} s after start-up), aios-fast {ow:.1f} s "
              f"({oa:.1f} s); speed-up {wall / ow:.1f}x end to end, {after / oa:.1f}x after start-up")
