"""The vocabulary of the benchmark suite: one timed side (:class:`Measurement`), a goal
(:class:`Goal`), one reported figure beside its peer (:class:`Figure`), and the context a group
runs in (:class:`BenchContext`).

Every figure is a ratio against a peer measured in the same run. Rounds alternate ours and the
peer (:func:`paired_rounds`) so that load from other processes hits both alike; the ratio is the
median of the per-round ratios and its spread is their minimum and maximum.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Measurement", "Goal", "Figure", "BenchContext", "Sizes", "paired_rounds", "timed", "measure",
           "STATUSES", "CaseFailed"]

# What a figure's status means (report.schema.json lists the same values):
#   pass / fail   measured, correct, and the goal was met / missed
#   info          measured and correct, no goal for this figure
#   incorrect     a result failed its correctness check (the times are kept, the figure is void)
#   error         the case raised before a figure could be measured
#   not run       the group needs what this machine lacks (a GPU, a peer tool); reason given
STATUSES = ("pass", "fail", "info", "incorrect", "error", "not run")


def _sig(x: float) -> float:
    """``x`` to 6 significant digits: sub-millisecond rounds keep their precision in JSON."""
    return float(f"{x:.6g}")


class CaseFailed(AssertionError):
    """A benchmark result failed its correctness check (the message says which and by how much)."""


@dataclass
class Measurement:
    """The seconds of one side (ours or the peer) over the timed rounds."""

    name: str
    rounds: list[float]
    clock: str = "wall"  # "wall" (perf_counter) or "cpu" (process_time, all threads)

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "clock": self.clock, "unit": "s",
                "rounds": [_sig(r) for r in self.rounds], "median": _sig(self.median),
                "min": _sig(min(self.rounds)), "max": _sig(max(self.rounds))}


@dataclass(frozen=True)
class Goal:
    """A target for a figure's quoted value: ``value op target`` (``op`` is ``>=`` or ``<=``)."""

    op: str
    target: float
    text: str

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"Goal.op must be '>=' or '<=', got {self.op!r}")

    def met(self, value: float) -> bool:
        return value >= self.target if self.op == ">=" else value <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "target": self.target, "text": self.text}


@dataclass
class Figure:
    """One reported number: ours beside the peer, as a ratio, checked for correctness.

    ``metric`` says how the ratio is quoted:
      * ``"speedup"``: value = peer / ours (× faster; > 1 means ours is faster);
      * ``"overhead"``: value = 100 · (ours / peer − 1) (% extra time; ours is the peer plus
        something, e.g. a forward with hooks against the plain forward);
      * ``"time"``: no peer; value = ours' median seconds.
    Per-round ratios (rounds are paired) give ``ratio_spread`` in the same unit as ``value``.
    """

    id: str
    group: str
    title: str
    ours: Measurement | None = None
    peer: Measurement | None = None
    metric: str = "speedup"
    goal: Goal | None = None
    check: str = ""
    status: str = "info"
    reason: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def _quote(self, ours: float, peer: float) -> float:
        if self.metric == "speedup":
            return peer / ours
        if self.metric == "overhead":
            return 100.0 * (ours / peer - 1.0)
        return ours

    @property
    def value(self) -> float | None:
        """The quoted figure: median of the per-round ratios (or of ours' seconds for "time")."""
        per = self.per_round()
        return statistics.median(per) if per else None

    def per_round(self) -> list[float]:
        if self.ours is None:
            return []
        if self.metric == "time" or self.peer is None:
            return list(self.ours.rounds)
        n = min(len(self.ours.rounds), len(self.peer.rounds))
        return [self._quote(o, p) for o, p in zip(self.ours.rounds[:n], self.peer.rounds[:n])]

    @property
    def unit(self) -> str:
        return {"speedup": "x", "overhead": "%", "time": "s"}[self.metric]

    def finish(self) -> "Figure":
        """Set ``status`` from the goal once the figure is measured and checked."""
        if self.status in ("incorrect", "error", "not run"):
            return self
        v = self.value
        if v is None:
            self.status, self.reason = "error", self.reason or "no measurement"
        elif self.goal is None:
            self.status = "info"
        else:
            self.status = "pass" if self.goal.met(v) else "fail"
        return self

    def to_dict(self) -> dict[str, Any]:
        per = self.per_round()
        v = self.value
        return {
            "id": self.id, "group": self.group, "title": self.title, "metric": self.metric,
            "unit": self.unit,
            "value": None if v is None else _sig(v),
            "spread": [_sig(min(per)), _sig(max(per))] if per else None,
            "ours": self.ours.to_dict() if self.ours else None,
            "peer": self.peer.to_dict() if self.peer else None,
            "goal": self.goal.to_dict() if self.goal else None,
            "status": self.status, "reason": self.reason, "check": self.check,
            "config": self.config, "extra": self.extra,
        }


@dataclass(frozen=True)
class Sizes:
    """Work sizes for one tier (see :mod:`aios_fast.bench.sizes`)."""

    tier: str
    quick: bool
    rounds: int
    probe_batch: tuple[int, int]
    svd_shapes: tuple[tuple[int, int], ...]
    svd_ranks: tuple[int, ...]
    extract_pairs: tuple[str, ...]
    gpu_extract_pairs: tuple[str, ...] = ()
    extract_rank: int = 16
    route_skills: tuple[int, ...] = (10, 100, 1000, 10000)
    train_quality_seeds: tuple[int, ...] = (0, 1, 2)  # () leaves the (minutes-long) group out

    def to_dict(self) -> dict[str, Any]:
        return {"tier": self.tier, "quick": self.quick, "rounds": self.rounds,
                "probe_batch": list(self.probe_batch), "svd_shapes": [list(s) for s in self.svd_shapes],
                "svd_ranks": list(self.svd_ranks), "extract_pairs": list(self.extract_pairs),
                "gpu_extract_pairs": list(self.gpu_extract_pairs), "extract_rank": self.extract_rank,
                "route_skills": list(self.route_skills), "train_quality_seeds": list(self.train_quality_seeds)}


@dataclass
class BenchContext:
    """What a group needs: sizes, a scratch directory, a progress callback, the GPU flag."""

    sizes: Sizes
    workdir: Path
    has_cuda: bool = False
    progress: Callable[[str], None] = lambda msg: None


def timed(fn: Callable[[], Any], clock: str = "wall") -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes on ``clock`` ("wall" or "cpu"), and its result."""
    now = time.perf_counter if clock == "wall" else time.process_time
    t = now()
    out = fn()
    return now() - t, out


def paired_rounds(ours: Callable[..., Any], peer: Callable[..., Any] | None, rounds: int, *,
                  warmup: int = 1, clock: str = "wall", swap: bool = True,
                  setup: tuple[Callable[[], Any] | None, Callable[[], Any] | None] = (None, None)
                  ) -> tuple[list[float], list[float], Any, Any]:
    """Time ``rounds`` rounds of ``ours`` and ``peer`` alternately (the order flips each round
    when ``swap``, so neither side always runs on a warm cache). ``setup`` = (for ours, for the
    peer): an untimed call before every timed one whose result is the timed call's argument
    (e.g. a fresh copy of a model). Returns both lists of seconds and the last result of each
    side (for the correctness checks)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    ours, peer = _with_setup(ours, setup[0]), _with_setup(peer, setup[1])
    res_o = res_p = None
    for _ in range(warmup):
        res_o = ours(clock)[1]
        if peer is not None:
            res_p = peer(clock)[1]
    t_o: list[float] = []
    t_p: list[float] = []
    for i in range(rounds):
        order = [("o", ours), ("p", peer)]
        if swap and i % 2:
            order.reverse()
        for side, fn in order:
            if fn is None:
                continue
            dt, out = fn(clock)
            if side == "o":
                t_o.append(dt)
                res_o = out
            else:
                t_p.append(dt)
                res_p = out
    return t_o, t_p, res_o, res_p


def _with_setup(fn: Callable[..., Any] | None, setup: Callable[[], Any] | None):
    """``fn`` as a ``clock -> (seconds, result)`` callable that runs ``setup`` untimed first."""
    if fn is None:
        return None
    if setup is None:
        return lambda clock: timed(fn, clock)

    def run(clock: str):
        arg = setup()
        return timed(lambda: fn(arg), clock)
    return run


def measure(fig: Figure, ours: Callable[[], Any], peer: Callable[[], Any] | None,
            check: Callable[[Any, Any], None] | None, *, rounds: int, warmup: int = 1,
            clock: str = "wall", ours_name: str = "aios-fast", peer_name: str | None = None,
            setup: tuple[Callable[[], Any] | None, Callable[[], Any] | None] = (None, None)) -> Figure:
    """Fill ``fig`` by timing ``ours`` beside ``peer`` (see :func:`paired_rounds`) and checking
    the last results with ``check(ours_result, peer_result)``, which raises :class:`CaseFailed`
    (or AssertionError) when a result is wrong. A failed check makes the figure "incorrect";
    any other exception makes it "error" with the exception as the reason. Returns ``fig``."""
    try:
        t_o, t_p, r_o, r_p = paired_rounds(ours, peer, rounds, warmup=warmup, clock=clock, setup=setup)
    except Exception as exc:  # noqa: BLE001 - a broken case is reported, the suite goes on
        fig.status, fig.reason = "error", f"{type(exc).__name__}: {exc}"
        return fig
    fig.ours = Measurement(ours_name, t_o, clock)
    if peer is not None:
        fig.peer = Measurement(peer_name or "peer", t_p, clock)
    if check is not None:
        try:
            check(r_o, r_p)
        except AssertionError as exc:
            fig.status, fig.reason = "incorrect", str(exc) or type(exc).__name__
            return fig
        except Exception as exc:  # noqa: BLE001
            fig.status, fig.reason = "error", f"check raised {type(exc).__name__}: {exc}"
            return fig
    return fig.finish()
