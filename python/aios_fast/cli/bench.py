"""`aios-fast bench`: run the benchmark suite for this machine's tier and write a report;
`aios-fast bench compare A.json B.json`: two reports side by side;
`aios-fast bench render REPORT.json [--into BENCHMARKS.md]`: a report's tables as Markdown (printed,
or put between the ``<!-- bench-report:begin -->`` / ``<!-- bench-report:end -->`` markers of a file).
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from ._common import add_json_flag, print_json

# spelled out: building the parser must not import torch (a test checks it against bench.runner.GROUPS)
_GROUPS = ("probe", "cards", "svd", "route", "train_quality", "extract", "gpu")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run the benchmark suite (ratios to peers, checked) and write report.json/md/PNGs",
        description="Run each benchmark group sized for this machine's tier (leaf, hub, super), every "
                    "figure beside a peer measured in the same run and checked for correctness. Writes "
                    "OUT/report.json (schema: aios_fast/bench/report.schema.json), OUT/report.md and one "
                    "PNG chart per group. Groups: " + ", ".join(_GROUPS) + " (gpu: 'not run' without a GPU; "
                    "train_quality: 'not run' with --quick). 'aios-fast bench render REPORT.json --into "
                    "BENCHMARKS.md' puts a report's tables into a Markdown file.")
    p.add_argument("--tier", default="auto", choices=("auto", "leaf", "hub", "super"),
                   help="size the work for this tier (default: detect it)")
    p.add_argument("--only", action="append", metavar="GROUP",
                   help=f"run only these groups (repeatable or comma-separated): {', '.join(_GROUPS)}")
    p.add_argument("--out", type=Path, default=Path("bench-report"), help="output directory (default bench-report)")
    p.add_argument("--quick", action="store_true", help="smoke-sized work: a few minutes on 2 cores, not for quoting")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    add_json_flag(p)
    p.set_defaults(func=_run)
    bsub = p.add_subparsers(dest="bench_command", metavar="[compare|render]", required=False)

    c = bsub.add_parser("compare", help="print two reports' figures side by side")
    c.add_argument("a", type=Path, help="first report.json")
    c.add_argument("b", type=Path, help="second report.json")
    add_json_flag(c)
    c.set_defaults(func=_compare)

    m = bsub.add_parser(
        "render", aliases=["markdown"], help="a report's tables as Markdown, printed or put into a file",
        description="Render REPORT.json as Markdown tables grouped by group (figure, ours and the peer's "
                    "medians, ratio, spread over rounds, goal, status), headed by the command and report that "
                    "produced them, the machine, the tier and the versions. Without --into the Markdown is "
                    "printed; with --into FILE it replaces the block between '<!-- bench-report:begin -->' and "
                    "'<!-- bench-report:end -->' in FILE (or goes after FILE's title and introduction when the "
                    "markers are absent), written atomically.")
    m.add_argument("report", type=Path, help="report.json written by aios-fast bench")
    m.add_argument("--into", type=Path, help="Markdown file to update in place (e.g. BENCHMARKS.md)")
    m.add_argument("--name", help="name of the block, for several reports in one file "
                                  "(markers '<!-- bench-report:begin NAME -->' ...)")
    m.set_defaults(func=_render)


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _run(args: argparse.Namespace) -> int:
    from ..bench import run_suite, write_report
    from ..bench.report import format_value

    only = [g.strip() for item in (args.only or []) for g in item.split(",") if g.strip()] or None
    report = run_suite(tier=args.tier, only=only, quick=args.quick,
                       command=_command_line(args, only),
                       progress=not (args.no_progress or args.json))
    path = write_report(report, args.out)
    if args.json:
        print_json(report)
    else:
        from rich.table import Table

        t = Table(title=f"aios-fast bench: {report['tier']['name']} tier{' (quick)' if args.quick else ''}, "
                        f"{report['seconds']:.0f} s")
        for col in ("figure", "ratio", "spread", "goal", "status"):
            t.add_column(col)
        for f in report["figures"]:
            spread = f"{f['spread'][0]:.3g} … {f['spread'][1]:.3g}" if f["spread"] else ""
            t.add_row(f["id"], format_value(f), spread, f["goal"]["text"] if f["goal"] else "",
                      f["status"] + (f": {f['reason'][:80]}" if f["reason"] else ""))
        con = _console()
        con.print(t)
        for g in report["groups"]:
            if g["status"] != "run":
                con.print(f"{g['name']}: {g['status']} ({g['reason']})")
        con.print(f"report: {path} (+ report.md, charts)")
    bad = [f for f in report["figures"] if f["status"] in ("incorrect", "error")]
    bad_groups = [g for g in report["groups"] if g["status"] == "error"]
    return 1 if bad or bad_groups else 0


def _command_line(args: argparse.Namespace, only: list[str] | None) -> str:
    """The command as typed, rebuilt from the parsed arguments (main() may be called in process)."""
    parts = ["aios-fast", "bench"]
    if args.tier != "auto":
        parts += ["--tier", args.tier]
    if args.quick:
        parts.append("--quick")
    if only:
        parts += ["--only", ",".join(only)]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def _compare(args: argparse.Namespace) -> int:
    from ..bench.compare import compare_reports, print_comparison

    cmp = compare_reports(args.a, args.b)
    if args.json:
        print_json(cmp)
    else:
        print_comparison(cmp, _console())
    return 0


def _render(args: argparse.Namespace) -> int:
    from ..bench.report import load_report, markers, render_markdown, update_markdown_section

    report = load_report(args.report)
    if args.into is None:
        markers(args.name)  # a bad --name is refused here too
        print(render_markdown(report, str(args.report)).rstrip())
        return 0
    update_markdown_section(args.into, report, args.report, name=args.name)
    begin, _ = markers(args.name)
    print(f"{args.into}: block {begin} rendered from {args.report}")
    return 0
