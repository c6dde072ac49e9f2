"""Benchmark group ``route``: routing latency of one already-encoded query.

Shared by ``aios-fast bench --only route`` (:func:`run`) and ``benchmarks/bench_router.py``
part (a) (which times the same bodies with pytest-benchmark):

* ours: ``LoRARouter.route_embeddings`` (scores, ranking AND calibrated confidence; its
  one-query path is the compiled ``route_topk`` scan of ``aios_fast.kernels.route``);
* ArrowEngine's way: a Python loop of cosine similarities over every skill embedding
  (:func:`python_loop`);
* a NumPy brute force: one mat-vec, per-skill max by ``reduceat``, top-3 by ``argpartition``,
  no confidence (:func:`numpy_brute`).

Skills: 10, 100, 1,000 and 10,000 with 10 examples each, random unit embeddings (routing
latency does not depend on what the texts say); the query is one example of a planted skill
plus noise. Goals: ≥ 100× the Python loop at 1,000 skills; within 2× of the NumPy brute
force's time (quoted as a speed-up, ≥ 0.5×). Correctness: every side ranks the planted skill
first (and the router's confidence is a probability).

NumPy and torch run on one thread (ours and the peers alike): on a machine shared with other
jobs, BLAS worker threads spinning against them cost 10× on a mat-vec.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

from ..core import BenchContext, CaseFailed, Figure, Goal, measure

__all__ = ["SKILLS", "EXAMPLES", "DIM", "RouteIndex", "make_index", "python_loop", "numpy_brute", "route",
           "check_route", "check_top", "one_thread", "run"]

SKILLS = (10, 100, 1000, 10000)
EXAMPLES = 10
DIM = 384
LOOP_GOAL_AT = 1000  # the skill count the "≥ 100× the Python loop" goal is stated for


class _NoEncoder:
    """Routing after encoding needs no encoder; any call to one is a bug in the case."""

    model = None

    def encode(self, texts):  # pragma: no cover - reaching it is the bug it reports
        raise AssertionError("the routing benchmark must not encode")


@dataclass
class RouteIndex:
    """``skills`` skills of ``EXAMPLES`` random unit embeddings each, a router over them, the
    same embeddings in the peers' layouts, and a query planted next to ``target``."""

    skills: int
    router: Any
    E: np.ndarray                       # (skills · EXAMPLES, DIM), rows grouped by skill
    starts: np.ndarray                  # first row of each skill (for ``reduceat``)
    names: list[str]
    per_skill: list[tuple[str, np.ndarray]]
    q: np.ndarray                       # (DIM,) unit query
    target: str


def make_index(skills: int, examples: int = EXAMPLES, dim: int = DIM) -> RouteIndex:
    """The case for ``skills`` skills (seeded by the skill count: same index every run)."""
    from ...route.router import LoRARouter

    rng = np.random.default_rng(skills)
    E = rng.normal(size=(skills * examples, dim)).astype(np.float32)
    E /= np.linalg.norm(E, axis=1, keepdims=True)
    names = [f"skill{i}" for i in range(skills)]
    router = LoRARouter(_NoEncoder())
    router._fp = "bench"  # no encoder to fingerprint
    router.add_skills([{"name": names[i], "examples": [f"example {j}" for j in range(examples)],
                        "embeddings": E[i * examples:(i + 1) * examples]} for i in range(skills)])
    t = skills // 2
    q = E[t * examples] + 0.05 * rng.normal(size=dim).astype(np.float32)
    q /= np.linalg.norm(q)
    per_skill = [(names[i], E[i * examples:(i + 1) * examples]) for i in range(skills)]
    return RouteIndex(skills, router, E, np.arange(0, skills * examples, examples), names, per_skill, q,
                      names[t])


def route(index: RouteIndex) -> Any:
    """Ours: the router's answer (a ``RouteResult``) for the one query."""
    return index.router.route_embeddings(index.q[None, :])[0]


def python_loop(per_skill: list[tuple[str, np.ndarray]], q: np.ndarray, top_k: int = 3) -> list[str]:
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


def numpy_brute(E: np.ndarray, starts: np.ndarray, names: list[str], q: np.ndarray, top_k: int = 3) -> list[str]:
    """One mat-vec, the best example per skill, the top ``top_k`` skills (no confidence)."""
    sims = E @ q
    per = np.maximum.reduceat(sims, starts)
    k = min(top_k, len(per))
    top = np.argpartition(-per, k - 1)[:k] if len(per) > k else np.arange(len(per))
    top = top[np.argsort(-per[top])]
    return [names[i] for i in top]


def check_route(result: Any, target: str) -> None:
    """The router ranks the planted skill first, with a confidence in [0, 1]."""
    if result.top != target:
        raise CaseFailed(f"router ranked {result.top!r} first, expected the planted {target!r}")
    if not 0.0 <= result.confidence <= 1.0:
        raise CaseFailed(f"router confidence {result.confidence} is not a probability")


def check_top(top: list[str], target: str, who: str) -> None:
    """A peer ranks the planted skill first."""
    if not top or top[0] != target:
        raise CaseFailed(f"{who} ranked {top[:1]} first, expected the planted {target!r}")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One BLAS and one torch intra-op thread while routing is timed (both sides alike)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(limits=1, user_api="blas")
        with limits:
            yield
    finally:
        torch.set_num_threads(n)


def _calls_per_round(fn: Callable[[], Any], target_s: float, cap: int = 5000) -> int:
    """How many calls of ``fn`` make one timed round of about ``target_s`` seconds: a call of
    the router takes microseconds, below what one clock reading resolves reliably."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-7)
    return int(min(cap, max(1, round(target_s / one))))


def _repeat(fn: Callable[[], Any], n: int) -> Callable[[], Any]:
    def many():
        out = None
        for _ in range(n):
            out = fn()
        return out
    return many


def _per_call(fig: Figure, n_ours: int, n_peer: int) -> Figure:
    """Turn the rounds' seconds (``n`` calls each, a different ``n`` per side) into seconds per
    call, and set the status again from the per-call ratios."""
    if fig.ours is not None:
        fig.ours.rounds = [t / n_ours for t in fig.ours.rounds]
    if fig.peer is not None:
        fig.peer.rounds = [t / n_peer for t in fig.peer.rounds]
    fig.config.update(calls_per_round_ours=n_ours, calls_per_round_peer=n_peer)
    return fig.finish()


def _figure(index: RouteIndex, peer: str, rounds: int, round_s: float) -> Figure:
    S = index.skills
    ours = lambda: route(index)  # noqa: E731
    if peer == "loop":
        peer_fn = lambda: python_loop(index.per_skill, index.q)  # noqa: E731
        fig = Figure(f"route.loop_{S}skills", "route",
                     f"route one encoded query, {S:,} skills × {EXAMPLES} examples, vs a Python loop of cosines",
                     goal=Goal(">=", 100.0, "≥ 100× the Python loop") if S == LOOP_GOAL_AT else None,
                     check="both rank the planted skill first; router confidence in [0, 1]")
        peer_name = "Python loop of cosines (ArrowEngine's way)"
    else:
        peer_fn = lambda: numpy_brute(index.E, index.starts, index.names, index.q)  # noqa: E731
        fig = Figure(f"route.numpy_{S}skills", "route",
                     f"route one encoded query, {S:,} skills × {EXAMPLES} examples, vs a NumPy brute force",
                     goal=Goal(">=", 0.5, "≤ 2× the NumPy brute force's time (≥ 0.5×)"),
                     check="both rank the planted skill first; router confidence in [0, 1]")
        peer_name = "NumPy brute force (mat-vec, reduceat, argpartition)"
    fig.config.update(skills=S, examples=EXAMPLES, dim=DIM, threads=1)
    n_o, n_p = _calls_per_round(ours, round_s), _calls_per_round(peer_fn, round_s)

    def check(r, top):
        check_route(r, index.target)
        check_top(top, index.target, peer_name)

    measure(fig, _repeat(ours, n_o), _repeat(peer_fn, n_p), check, rounds=rounds,
            ours_name="LoRARouter.route_embeddings", peer_name=peer_name)
    return _per_call(fig, n_o, n_p)


def run(ctx: BenchContext) -> list[Figure]:
    """The route group at ``ctx.sizes.route_skills`` skill counts, one thread."""
    figs: list[Figure] = []
    # sub-millisecond calls: more, shorter rounds cost little and steady the median
    rounds = max(ctx.sizes.rounds, 5)
    round_s = 0.02 if ctx.sizes.quick else 0.05
    with one_thread():
        for S in ctx.sizes.route_skills:
            ctx.progress(f"{S:,} skills: building the index")
            index = make_index(S)
            for peer in ("numpy", "loop"):
                ctx.progress(f"{S:,} skills vs the {peer}")
                # the loop at 10,000 skills takes ~1 s a call: as many rounds as the tier asks
                figs.append(_figure(index, peer, ctx.sizes.rounds if peer == "loop" and S >= 10000 else rounds,
                                    round_s))
    return figs
