"""Routing benchmarks, one run, each figure beside its peer:

(a) routing latency of one already-encoded query against 10, 100, 1,000 and 10,000 skills with
    10 examples each: ``LoRARouter.route_embeddings`` (scores, ranking AND calibrated
    confidence) vs ArrowEngine's way (a Python loop of cosine similarities over the skill
    embeddings) vs a plain NumPy brute force (one mat-vec, per-skill max by ``reduceat``, top-3
    by ``argpartition``; no confidence). Goals: >= 100x the Python loop at 1,000 skills, within
    2x of the NumPy brute force. The router's one-query path is the compiled ``route_topk`` scan
    (int8 copy of the examples with a certified bound, exact float32 rescoring; see
    ``aios_fast.kernels.route``), so it reads a quarter of the bytes the NumPy peer reads.
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
SUMMARY = Path(os.environ.get("AIOS_ROUTER_BENCH_SUMMARY", "/tmp/aios-sections/router_summary.json"))
SIZES = [10, 100, 1000, 10000]
EXAMPLES = 10
DIM = 384
RESULTS: dict[str, float] = {}


def _record(benchmark, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        RESULTS[name] = stats.stats.median


class _NoEncoder:
    """Routing after encoding needs no encoder; any call to one is a bug in the benchmark."""

    model = None

    def encode(self, texts):  # pragma: no cover
        raise AssertionError("the routing benchmark must not encode")


@pytest.fixture(scope="module")
def one_blas_thread():
    """One BLAS thread for the NumPy mat-vecs (ours and the peer's alike): on the shared 2-core
    machine OpenBLAS's worker threads spinning against other tenants cost 10x on a mat-vec."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module", params=SIZES, ids=[f"{s}skills" for s in SIZES])
def skills(request, one_thread, one_blas_thread):
    from aios_fast.route.router import LoRARouter

    S = request.param
    rng = np.random.default_rng(S)
    E = rng.normal(size=(S * EXAMPLES, DIM)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    router = LoRARouter(_NoEncoder())
    router._fp = "bench"
    router.add_skills([{"name": f"skill{i}", "examples": [f"example {j}" for j in range(EXAMPLES)],
                        "embeddings": E[i * EXAMPLES:(i + 1) * EXAMPLES]} for i in range(S)])
    target = S // 2
    q = E[target * EXAMPLES] + 0.05 * rng.normal(size=DIM).astype(np.float32)
    q /= np.linalg.norm(q)
    per_skill = [(f"skill{i}", E[i * EXAMPLES:(i + 1) * EXAMPLES]) for i in range(S)]
    return {"S": S, "router": router, "E": E, "q": q, "target": f"skill{target}", "per_skill": per_skill,
            "starts": np.arange(0, S * EXAMPLES, EXAMPLES)}


def python_loop(per_skill, q, top_k=3):
    """ArrowEngine's way: cosine similarity of the query with each skill embedding, in Python."""
    qn = float(np.linalg.norm(q))
    scores = []
    for name, emb in per_skill:
        best = -1.0
        for e in emb:
            best = max(best, float(np.dot(q, e) / (qn * float(np.linalg.norm(e)))))
        scores.append((best, name))
    scores.sort(reverse=True)
    return [n for _, n in scores[:top_k]]


def numpy_brute(E, starts, names, q, top_k=3):
    sims = E @ q
    per = np.maximum.reduceat(sims, starts)
    k = min(top_k, len(per))
    top = np.argpartition(-per, k - 1)[:k] if len(per) > k else np.arange(len(per))
    top = top[np.argsort(-per[top])]
    return [names[i] for i in top]


@pytest.mark.benchmark(group="route-after-encoding")
def test_router(benchmark, skills):
    router, q = skills["router"], skills["q"][None, :]
    r = benchmark(router.route_embeddings, q)[0]
    assert r.top == skills["target"] and 0.0 <= r.confidence <= 1.0
    _record(benchmark, f"router/{skills['S']}")


@pytest.mark.benchmark(group="route-after-encoding")
def test_numpy_brute_force(benchmark, skills):
    names = [n for n, _ in skills["per_skill"]]
    top = benchmark(numpy_brute, skills["E"], skills["starts"], names, skills["q"])
    assert top[0] == skills["target"]
    _record(benchmark, f"numpy/{skills['S']}")


@pytest.mark.benchmark(group="route-after-encoding")
def test_python_loop(benchmark, skills):
    rounds = 1 if skills["S"] >= 10000 else 3 if skills["S"] >= 1000 else 20
    top = benchmark.pedantic(python_loop, args=(skills["per_skill"], skills["q"]), rounds=rounds,
                             iterations=1)
    assert top[0] == skills["target"]
    _record(benchmark, f"loop/{skills['S']}")


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
