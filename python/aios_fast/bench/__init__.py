"""The benchmark suite as a product: ``aios-fast bench``.

Runs each benchmark group sized for the machine's tier (Leaf, Hub, Super), every figure beside
a peer measured in the same run and checked for correctness, and writes ``report.json``
(schema: ``report.schema.json`` in this package), ``report.md`` and PNG charts. The
pytest-benchmark files in ``benchmarks/`` time the same case bodies (``aios_fast.bench.cases``).

    from aios_fast.bench import run_suite, write_report
    report = run_suite(tier="auto", only=["probe"], quick=True)
    write_report(report, Path("bench-out"))
"""

from __future__ import annotations

from .compare import compare_reports
from .core import BenchContext, CaseFailed, Figure, Goal, Measurement, measure, paired_rounds
from .report import load_report, render_markdown, schema, update_markdown_section, validate_report, write_report
from .runner import GROUPS, run_suite
from .sizes import resolve_tier, sizes_for

__all__ = ["run_suite", "write_report", "load_report", "validate_report", "schema", "render_markdown",
           "update_markdown_section", "compare_reports", "GROUPS", "Figure", "Goal", "Measurement",
           "BenchContext", "CaseFailed", "measure", "paired_rounds", "sizes_for", "resolve_tier"]
