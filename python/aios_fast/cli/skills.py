"""`aios-fast skills list|add|remove|route|calibrate|log`: a node's skill library from the shell.

The library is ``--library DIR`` (default: ``$AIOS_FAST_SKILLS`` or ``~/.aios_fast/skills``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._common import add_json_flag, console, print_json


def _default_dir() -> str:
    return os.environ.get("AIOS_FAST_SKILLS") or str(Path.home() / ".aios_fast" / "skills")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("skills", help="manage and query a node's skill library")
    ssub = p.add_subparsers(dest="skills_command", metavar="ACTION")

    def lib_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("--library", "-L", default=None,
                       help="library directory (default: $AIOS_FAST_SKILLS or ~/.aios_fast/skills)")
        add_json_flag(q)

    ls = ssub.add_parser("list", help="skills in the library (resolved versions; --all: every version)")
    ls.add_argument("--all", action="store_true", help="every version, passed or not")
    lib_arg(ls)
    ls.set_defaults(func=_list)

    add = ssub.add_parser("add", help="add a .lora.arrow card (bytes copied verbatim, checked)")
    add.add_argument("card", help="path of a .lora.arrow card")
    add.add_argument("--example", "-e", action="append", default=[], help="an example text (repeatable)")
    add.add_argument("--examples-file", help="a text file with one example per line")
    add.add_argument("--description", "-d", help="description (default: the card's)")
    add.add_argument("--origin", default="trained", choices=("trained", "extracted", "peer"))
    add.add_argument("--version", type=int, help="explicit version (default: next)")
    lib_arg(add)
    add.set_defaults(func=_add)

    rm = ssub.add_parser("remove", help="remove a skill (every version, or --version N)")
    rm.add_argument("name")
    rm.add_argument("--version", type=int)
    lib_arg(rm)
    rm.set_defaults(func=_remove)

    rt = ssub.add_parser("route", help="route queries to the library's skills")
    rt.add_argument("query", nargs="+", help="one or more queries")
    rt.add_argument("--top-k", type=int, default=3)
    rt.add_argument("--threshold", type=float, default=0.5)
    lib_arg(rt)
    rt.set_defaults(func=_route)

    cal = ssub.add_parser("calibrate", help="fit the routing confidence on the skills' examples")
    cal.add_argument("--negatives", help="text file of out-of-domain texts, one per line "
                                         "(default: the package's general corpus)")
    lib_arg(cal)
    cal.set_defaults(func=_calibrate)

    lg = ssub.add_parser("log", help="the trigger's decisions (what was unsure, what fired)")
    lg.add_argument("--last", type=int, default=20, help="how many decisions (default 20; 0 = all)")
    lg.add_argument("--fired", action="store_true", help="only decisions that fired a request")
    lib_arg(lg)
    lg.set_defaults(func=_log)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _library(args: argparse.Namespace, must_exist: bool = True, encoder=None):
    from ..errors import InputError
    from ..route.library import SkillLibrary

    d = Path(args.library or _default_dir())
    if must_exist and not d.is_dir():
        raise InputError(f"--library {d}: no such library directory")
    return SkillLibrary(d, encoder=encoder)


def _read_lines(path: str, what: str) -> list[str]:
    from ..errors import InputError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} {path}: cannot read it ({exc})") from None
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _entry_row(e) -> dict:
    return {"name": e.name, "version": e.version, "key": e.key, "origin": e.origin,
            "passed": e.passed, "examples": len(e.examples), "description": e.description,
            "content_hash": e.content_hash, "path": str(e.path)}


def _list(args: argparse.Namespace) -> int:
    lib = _library(args)
    rows = [_entry_row(e) for e in lib.list(all_versions=args.all)]
    if args.json:
        print_json({"library": str(lib.directory), "skills": rows, "problems": lib.problems})
        return 0
    from rich.table import Table

    c = console()
    t = Table(title=f"skills in {lib.directory}")
    for col in ("skill", "origin", "gate", "examples", "description"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["key"], r["origin"], "passed" if r["passed"] else "failed", str(r["examples"]),
                  r["description"][:60])
    c.print(t)
    for p in lib.problems:
        c.print(f"[yellow]skipped:[/] {p}")
    return 0


def _add(args: argparse.Namespace) -> int:
    examples = list(args.example)
    if args.examples_file:
        examples += _read_lines(args.examples_file, "--examples-file")
    lib = _library(args, must_exist=False)
    e = lib.add(args.card, examples, args.description, origin=args.origin, version=args.version)
    if args.json:
        print_json(_entry_row(e))
    else:
        console().print(f"added {e.key} ({e.origin}, gate {'passed' if e.passed else 'failed'}, "
                        f"{len(e.examples)} example(s)) to {lib.directory}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    lib = _library(args)
    removed = [e.key for e in lib.versions(args.name) if args.version in (None, e.version)]
    lib.remove(args.name, args.version)
    if args.json:
        print_json({"removed": removed})
    else:
        console().print(f"removed {', '.join(removed)}")
    return 0


def _router(args: argparse.Namespace, threshold: float = 0.5):
    from ..engines import SentenceEncoder
    from ..route.router import LoRARouter

    enc = SentenceEncoder()
    return LoRARouter(enc, _library(args, encoder=enc), threshold=threshold)


def _route(args: argparse.Namespace) -> int:
    from ..errors import InputError

    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    router = _router(args, args.threshold)
    results = router.route_many(args.query, top_k=args.top_k)
    out = [{"query": q, **r.to_dict()} for q, r in zip(args.query, results)]
    if args.json:
        print_json({"calibration": router.calibration_state, "routes": out})
        return 0
    c = console()
    for r in out:
        ranked = ", ".join(f"{n} {s:.3f}" for n, s in r["ranked"]) or "no skills"
        c.print(f"[bold]{r['query']}[/]\n  -> {r['skill'] or 'none'} (confidence {r['confidence']:.2f}, "
                f"margin {r['margin']:.3f}; {ranked})")
    if router.calibration_state != "fitted":
        c.print(f"[yellow]calibration: {router.calibration_state}[/] (run `aios-fast skills calibrate`)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    negatives = _read_lines(args.negatives, "--negatives") if args.negatives else None
    router = _router(args)
    metrics = router.calibrate(negatives=negatives)
    if args.json:
        print_json({"library": str(router.library.directory), **metrics})
    else:
        console().print(f"calibrated on {metrics['n_in_domain']} example(s) and {metrics['n_negatives']} "
                        f"negative(s): ECE {metrics['ece']:.3f}, AUROC {metrics['auroc']:.3f} "
                        f"(out-of-fold); saved to {router.library.calibration_path}")
    return 0


def _log(args: argparse.Namespace) -> int:
    from ..evolve.trigger import read_decision_log

    lib = _library(args)
    rows = read_decision_log(lib.directory / "trigger" / "decisions.jsonl")
    if args.fired:
        rows = [r for r in rows if r.get("fired")]
    if args.last:
        rows = rows[-args.last:]
    if args.json:
        print_json({"decisions": rows})
        return 0
    from datetime import datetime, timezone

    from rich.table import Table

    t = Table(title="trigger decisions")
    for col in ("time (UTC)", "query", "conf", "margin", "topic", "decision"):
        t.add_column(col)
    for r in rows:
        when = datetime.fromtimestamp(float(r.get("time", 0)), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        t.add_row(when, str(r.get("query", ""))[:50], f"{float(r.get('confidence', 0)):.2f}",
                  f"{float(r.get('margin', 0)):.3f}", str(r.get("topic_id") or "-"),
                  ("[bold green]fired[/]" if r.get("fired") else str(r.get("reason"))))
    console().print(t)
    return 0
