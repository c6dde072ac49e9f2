"""Runs the benchmark groups for a tier and assembles the report.

Each group is a module of :mod:`aios_fast.bench.cases` with ``run(ctx) -> list[Figure]``. A
group that needs a GPU is marked "not run" (with the reason) on a machine without one; a group
whose peer tool is missing marks its figures "not run" itself. An exception in one group marks
that group "error" and the suite goes on.
"""

from __future__ import annotations

import importlib
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..errors import InputError
from .core import BenchContext, Figure
from .machine import load_average, machine_info, versions
from .report import SCHEMA_ID
from .sizes import resolve_tier, sizes_for

__all__ = ["Group", "GROUPS", "run_suite"]


@dataclass(frozen=True)
class Group:
    name: str
    module: str
    needs_cuda: bool
    description: str


GROUPS: dict[str, Group] = {g.name: g for g in (
    Group("probe", "probe", False, "WeightMapProbe overhead on a MiniLM forward; token_norms kernel vs torch ops"),
    Group("cards", "cards", False, "skill-card load, apply, remove and inference overhead vs safetensors / PEFT"),
    Group("svd", "svd", False, "truncated SVD of a (tuned, base) pair and of one matrix vs torch.svd_lowrank"),
    Group("route", "route", False, "routing one encoded query over 10-10,000 skills vs a Python loop and NumPy"),
    Group("train_quality", "train_quality", False,
          "contrastive training quality on MiniLM vs ST + PEFT and a full fine-tune (minutes; not in --quick)"),
    Group("extract", "extract", False, "whole-model extraction vs mergekit-extract-lora (subprocesses)"),
    Group("gpu", "gpu", True, "CUDA kernels vs their torch references, probe overhead, SVD and extraction on GPU"),
)}


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def run_suite(tier: str = "auto", only: list[str] | None = None, quick: bool = False,
              command: str | None = None, workdir: Path | None = None, progress: bool = True
              ) -> dict[str, Any]:
    """Run the groups (all, or ``only``) sized for ``tier`` and return the report dict
    (see report.schema.json); :func:`aios_fast.bench.report.write_report` writes it out.

    Args:
        tier: "auto" (detect with :func:`aios_fast.hardware.detect`), "leaf", "hub" or "super".
        only: group names to run (others are left out of the report).
        quick: smoke-sized work (minutes on 2 cores); the figures are not for quoting.
        command: the command line recorded in the report.
        workdir: scratch directory for generated pairs and outputs (a temporary one by default;
            the extraction pairs themselves are cached under the aios_fast cache directory).
        progress: show a rich progress display on stderr.
    """
    import torch

    names = list(GROUPS) if not only else list(dict.fromkeys(only))
    unknown = [n for n in names if n not in GROUPS]
    if unknown:
        raise InputError(f"--only {','.join(unknown)}: unknown group(s); groups: {', '.join(GROUPS)}")
    chosen, profile = resolve_tier(tier)
    sizes = sizes_for(chosen, quick)
    has_cuda = torch.cuda.is_available()
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = machine_info(profile)
    t_start = time.perf_counter()
    figures: list[Figure] = []
    groups: list[dict[str, Any]] = []
    console = _console()
    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="aios-bench-")
        workdir = Path(tmp.name)
    try:
        with _Progress(console, len(names), enabled=progress) as bar:
            for name in names:
                g = GROUPS[name]
                t0 = time.perf_counter()
                entry = {"name": name, "status": "run", "reason": "", "seconds": 0.0, "figures": [],
                         "load_average": load_average()}
                if g.needs_cuda and not has_cuda:
                    entry.update(status="not run", reason="no CUDA GPU visible to torch on this machine")
                    groups.append(entry)
                    bar.done(name, "not run (no GPU)")
                    continue
                ctx = BenchContext(sizes=sizes, workdir=workdir / name, has_cuda=has_cuda,
                                   progress=lambda msg, name=name: bar.update(name, msg))
                ctx.workdir.mkdir(parents=True, exist_ok=True)
                try:
                    got = importlib.import_module(f"{__package__}.cases.{g.module}").run(ctx)
                except Exception as exc:  # noqa: BLE001 - one broken group must not sink the report
                    entry.update(status="error", reason=f"{type(exc).__name__}: {exc}")
                    got = []
                for f in got:
                    figures.append(f)
                    entry["figures"].append(f.id)
                if got and all(f.status == "not run" for f in got):
                    entry.update(status="not run", reason="; ".join(sorted({f.reason for f in got})))
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                groups.append(entry)
                bar.done(name, _tally(got) or entry["status"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    machine["load_average_end"] = load_average()
    mergekit = next((f.extra.get("mergekit_version") for f in figures if f.extra.get("mergekit_version")), None)
    return {
        "schema": SCHEMA_ID,
        "created": created,
        "command": command or "aios-fast bench " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "quick": quick,
        "seconds": round(time.perf_counter() - t_start, 3),
        "machine": machine,
        "tier": {"name": chosen, "detected": _detected(profile),
                 "reason": profile.reason, "forced": tier != "auto" or profile.overridden},
        "versions": versions(mergekit),
        "settings": {"only": only or None, "sizes": sizes.to_dict()},
        "groups": groups,
        "figures": [f.to_dict() for f in figures],
        "summary": dict(Counter(f.status for f in figures)),
    }


def _detected(profile) -> str:
    from ..hardware import classify

    return classify(profile.gpus, profile.ram_gb)[0].value


def _tally(figs: list[Figure]) -> str:
    c = Counter(f.status for f in figs)
    return ", ".join(f"{n} {k}" for k, n in sorted(c.items()))


class _Progress:
    """A rich progress display: one bar over the groups, the current step as its description."""

    def __init__(self, console, total: int, enabled: bool = True):
        self.console, self.total, self.enabled = console, total, enabled
        self._p = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._p = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                               TextColumn("{task.completed}/{task.total} groups"), TimeElapsedColumn(),
                               console=self.console, transient=True)
            self._p.__enter__()
            self._task = self._p.add_task("bench", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)

    def update(self, group: str, msg: str) -> None:
        if self._p is not None:
            self._p.update(self._task, description=f"[bold]{group}[/bold]: {msg}")

    def done(self, group: str, summary: str) -> None:
        if self._p is not None:
            self._p.advance(self._task)
            self._p.console.print(f"  {group}: {summary}")
