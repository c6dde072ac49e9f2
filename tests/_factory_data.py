"""Shared data for the factory tests: a QA log mixing three clearly different domains, each
full of its own invented jargon (a storage appliance, a payroll system, a restaurant kitchen),
so the bundled MiniLM has something real to learn. The records are logged unlabelled (the
QALogger's default domain "general"), shuffled, one second apart."""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "data" / "factory"
FERROWIND = HERE.parent / "python" / "aios_fast" / "learn" / "data" / "ferrowind.jsonl"
SOURCES = {"storage": FERROWIND, "payroll": DATA / "payroll.jsonl", "kitchen": DATA / "kitchen.jsonl"}
T0 = 1.7e9


def records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]


def mixed_records(seed: int = 0) -> list[tuple[str, dict]]:
    """(true domain, record) of the three domains, shuffled."""
    out = [(dom, r) for dom, p in SOURCES.items() for r in records(p)]
    random.Random(seed).shuffle(out)
    return out


def fill_log(log, recs, t0: float = T0) -> dict[str, str]:
    """Log ``recs`` (unlabelled) and return query -> true domain."""
    truth = {}
    for i, (dom, r) in enumerate(recs):
        log.log(r["query"], r["answer"], source="test", timestamp=t0 + i)
        truth[r["query"]] = dom
    log.flush()
    return truth
