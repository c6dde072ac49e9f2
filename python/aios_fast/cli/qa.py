"""`aios-fast qa import|export|stats`: move QA records between JSONL files and a QALogger log."""

from __future__ import annotations

import argparse

from ._args import existing_file
from ._common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("qa", help="import/export QA records to and from a QALogger log")
    qsub = p.add_subparsers(dest="qa_command", metavar="ACTION")

    imp = qsub.add_parser("import", help="append records from a JSONL file (duplicates dropped)")
    imp.add_argument("file", type=existing_file, help="JSONL, one object per line: query, answer[, source, domain, "
                                  "timestamp, router_confidence, skill_used]")
    imp.add_argument("--log", required=True, help="log directory (created if missing)")
    add_json_flag(imp)
    imp.set_defaults(func=_import)

    exp = qsub.add_parser("export", help="write the log (optionally filtered) to a JSONL file")
    exp.add_argument("--log", required=True, help="log directory")
    exp.add_argument("file", help="output JSONL file (written atomically)")
    exp.add_argument("--domain", action="append", help="only this domain (repeatable)")
    exp.add_argument("--since", help="ISO-8601 time, inclusive")
    exp.add_argument("--until", help="ISO-8601 time, exclusive")
    add_json_flag(exp)
    exp.set_defaults(func=_export)

    st = qsub.add_parser("stats", help="records per domain, fragments and bytes")
    st.add_argument("--log", required=True, help="log directory")
    add_json_flag(st)
    st.set_defaults(func=_stats)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _open(path: str, must_exist: bool):
    from pathlib import Path

    from ..errors import InputError
    from ..learn.qa_logger import QALogger

    if must_exist and not Path(path).is_dir():
        raise InputError(f"--log {path}: no such log directory")
    if Path(path).exists() and not Path(path).is_dir():
        raise InputError(f"--log {path}: is a file; expected a log directory")
    try:
        return QALogger(path)
    except OSError as exc:
        raise InputError(f"--log {path}: cannot open the log: {exc.strerror}") from None


def _import(args: argparse.Namespace) -> int:
    from ..errors import InputError

    with _open(args.log, must_exist=False) as log:
        try:
            added, dups = log.import_jsonl(args.file)
        except InputError as exc:
            raise InputError(f"FILE {args.file}: {exc}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"FILE {args.file}: cannot read UTF-8 JSONL: {exc}") from None
        total = len(log)
    out = {"file": args.file, "log": args.log, "added": added, "duplicates": dups, "total": total}
    if args.json:
        print_json(out)
    else:
        console().print(f"imported {added} record(s) from {args.file} into {args.log} "
                        f"({dups} duplicate(s) dropped; {total} in the log)")
    return 0


def _export(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..learn.records import parse_timestamp

    for flag, value in (("--since", args.since), ("--until", args.until)):
        if value is not None:
            parse_timestamp(value, flag)  # InputError naming the flag
    with _open(args.log, must_exist=True) as log:
        try:
            n = log.export_jsonl(args.file, since=args.since, until=args.until, domain=args.domain)
        except OSError as exc:
            raise InputError(f"FILE {args.file}: cannot write: {exc.strerror}") from None
    if args.json:
        print_json({"file": args.file, "log": args.log, "records": n})
    else:
        console().print(f"exported {n} record(s) from {args.log} to {args.file}")
    return 0


def _stats(args: argparse.Namespace) -> int:
    with _open(args.log, must_exist=True) as log:
        t = log.collect()
        doms = t.group_by("domain").aggregate([("key", "count")]).to_pylist() if t.num_rows else []
        out = {"log": args.log, "records": t.num_rows, "fragments": len(log.fragments()),
               "bytes": log.nbytes(), "domains": {d["domain"]: d["key_count"] for d in doms}}
    if args.json:
        print_json(out)
    else:
        c = console()
        c.print(f"{out['records']} record(s) in {out['fragments']} fragment(s), {out['bytes']} bytes")
        for d, n in sorted(out["domains"].items()):
            c.print(f"  {d}: {n}")
    return 0
