"""Routing benchmarks, one run, each figure beside its peer:

(a) routing latency of one already-encoded query against 10, 100, 1,000 and 10,000 skills with
    10 examples each: ``LoRARouter.route_embeddings`` (scores, ranking AND calibrated
    confidence) vs ArrowEngine's way (a Python loop of cosine similarities over the skill
    embeddings) vs a plain NumPy brute force (one mat-vec, per-skill max by ``reduceat``, top-3
    by ``argpartition``; no confidence). Goals: >= 100x the Python loop at 1,000 skills, within
    2x of the NumPy brute force. The router's one-query path is the compiled ``route_topk`` scan
    (int8 copy of the examples with a certified bound, exact float32 rescoring; see
    ``aios_fast.kernels.route``), so it reads a quarter of the bytes the NumPy peer reads.
    The index, the query, the three bodies and their checks are ``aios_fast.bench.cases.route``,
    which ``aios-fast bench --only route`` runs too.
(b) ``SkillNode.encode_with_lora`` on one sentence vs the encoder forwards it needs: one plain
    ``encode`` when no skill applies (the routing embedding is the answer), a plain plus an
    adapted ``encode`` when one does. Goal: at most 10 % above.

Routing latency does not depend on what the example texts say, so (a) uses random unit
embeddings; (b) uses the bundled MiniLM and real cards.

    python -m pytest benchmarks/bench_router.py --benchmark-only -q \\
        --benchmark-json /tmp/aios-sections/router.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from aios_fast.bench.cases import route as case  # noqa: E402 - (a)'s bodies, shared with `aios-fast bench`

SUMMARY = Path(os.environ.get("AIOS_ROUTER_BENCH_SUMMARY", "/tmp/aios-sections/router_summary.json"))
SIZES = list(case.SKILLS)
DIM = case.DIM
RESULTS: dict[str, float] = {}


def _record(benchmark, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS[name] = stats.stats.median


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS and one torch thread for the mat-vecs (ours and the peer's alike): on the shared
    2-core machine OpenBLAS's worker threads spinning against other tenants cost 10x on a mat-vec."""
    with case.one_thread():
        yield


@pytest.fixture(scope="module", params=SIZES, ids=[f"{s}skills" for s in SIZES])
def skills(request, one_blas_thread):
    return case.make_index(request.param)


@pytest.mark.benchmark(group="route-after-encoding")
def test_router(benchmark, skills):
    r = benchmark(case.route, skills)
    case.check_route(r, skills.target)
    _record(benchmark, f"router/{skills.skills}")


@pytest.mark.benchmark(group="route-after-encoding")
def test_numpy_brute_force(benchmark, skills):
    top = benchmark(case.numpy_brute, skills.E, skills.starts, skills.names, skills.q)
    case.check_top(top, skills.target, "NumPy brute force")
    _record(benchmark, f"numpy/{skills.skills}")


@pytest.mark.benchmark(group="route-after-encoding")
def test_python_loop(benchmark, skills):
    rounds = 1 if skills.skills >= 10000 else 3 if skills.skills >= 1000 else 20
    top = benchmark.pedantic(case.python_loop, args=(skills.per_skill, skills.q), rounds=rounds, iterations=1)
    case.check_top(top, skills.target, "Python loop")
    _record(benchmark, f"loop/{skills.skills}")


# --------------------------------------------------------------------------- (b) the node
SENT_NONE = "Who won the football world cup in 2010?"
SENT_SKILL = "How long should I boil an egg for a runny yolk?"


@pytest.fixture(scope="module")
def node(tmp_path_factory, one_thread):
    from aios_fast import SentenceEncoder, SkillNode
    from aios_fast.lora.random import linear_shapes, random_card

    enc = SentenceEncoder()
    node = SkillNode(encoder=enc, library_dir=tmp_path_factory.mktemp("bench") / "lib", start_worker=False)
    data = json.loads((Path(__file__).resolve().parents[1] / "tests" / "data" / "routing" /
                       "domains.json").read_text())
    shapes = linear_shapes(enc.model, r"attention\.self\.(query|value)$")
    for i, (name, d) in enumerate(data["domains"].items()):
        node.library.add(random_card(shapes, name=name, rank=8, seed=i), d["register"], d["description"])
    node.router.refresh()
    assert node.router.route(SENT_SKILL).skill == "cooking"
    assert node.router.route(SENT_NONE).skill is None
    yield node
    node.close()


@pytest.mark.benchmark(group="encode-one-sentence")
def test_plain_encode(benchmark, node):
    out = benchmark(node.encoder.encode, [SENT_NONE])
    assert out.shape == (1, DIM)
    _record(benchmark, "encode/plain")


@pytest.mark.benchmark(group="encode-one-sentence")
def test_encode_with_card_applied(benchmark, node):
    card = node._card("cooking")

    def run():
        with node.manager.applied(card, check_fingerprint=False):
            return node.encoder.encode([SENT_SKILL])

    out = benchmark(run)
    assert not torch.allclose(out, node.encoder.encode([SENT_SKILL]))
    _record(benchmark, "encode/applied")


@pytest.mark.benchmark(group="encode-one-sentence")
def test_encode_with_lora_no_skill(benchmark, node):
    out, route = benchmark(node.encode_with_lora, SENT_NONE, return_route=True)
    assert route.skill is None
    torch.testing.assert_close(out, node.encoder.encode([SENT_NONE]))
    _record(benchmark, "node/none")


@pytest.mark.benchmark(group="encode-one-sentence")
def test_encode_with_lora_skill(benchmark, node):
    out, route = benchmark(node.encode_with_lora, SENT_SKILL, return_route=True)
    assert route.skill == "cooking"
    _record(benchmark, "node/skill")


PAIRS = 25


@pytest.mark.benchmark(group="encode-paired")
def test_paired_overhead(benchmark, node):
    """Interleaved calls (each node call right beside the forwards it needs), so that load
    drifting on a shared machine hits both sides: the median of the per-pair ratios."""
    import time

    card = node._card("cooking")

    def applied():
        with node.manager.applied(card, check_fingerprint=False):
            return node.encoder.encode([SENT_SKILL])

    def timed(fn, *a, **k):
        t = time.perf_counter()
        fn(*a, **k)
        return time.perf_counter() - t

    def run():
        none, skill = [], []
        for _ in range(PAIRS):
            p = timed(node.encoder.encode, [SENT_NONE])
            none.append(timed(node.encode_with_lora, SENT_NONE) / p)
            two = timed(node.encoder.encode, [SENT_SKILL]) + timed(applied)
            skill.append(timed(node.encode_with_lora, SENT_SKILL) / two)
        return float(np.median(none)), float(np.median(skill))

    none, skill = benchmark.pedantic(run, rounds=1, iterations=1)
    RESULTS["paired/none"], RESULTS["paired/skill"] = none, skill
    assert none > 0 and skill > 0


@pytest.fixture(scope="module", autouse=True)
def summary():
    """After the module: ratios of the figures above, printed and written to SUMMARY."""
    yield
    if not RESULTS:
        return
    out: dict[str, dict[str, float]] = {"routing": {}, "encode": {}}
    for S in SIZES:
        r, n, l = (RESULTS.get(f"{k}/{S}") for k in ("router", "numpy", "loop"))
        if r:
            out["routing"][str(S)] = {"router_us": r * 1e6, "numpy_us": (n or 0) * 1e6,
                                      "loop_us": (l or 0) * 1e6,
                                      "loop_over_router": (l / r) if l else None,
                                      "router_over_numpy": (r / n) if n else None}
    p, a = RESULTS.get("encode/plain"), RESULTS.get("encode/applied")
    none, skill = RESULTS.get("node/none"), RESULTS.get("node/skill")
    if p and none:
        out["encode"]["no_skill_over_one_forward"] = none / p
    if p and a and skill:
        out["encode"]["skill_over_two_forwards"] = skill / (p + a)
    for k in ("none", "skill"):
        if f"paired/{k}" in RESULTS:
            out["encode"][f"paired_median_{'no_skill_over_one_forward' if k == 'none' else 'skill_over_two_forwards'}"] = RESULTS[f"paired/{k}"]
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
