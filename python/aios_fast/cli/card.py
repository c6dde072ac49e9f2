"""`aios-fast card`: inspect skill cards and convert them between v1, v2 and PEFT."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="inspect or convert .lora.arrow skill cards")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    i = verbs.add_parser("inspect", help="name, version, modules, ranks, dtypes, size, checksum")
    i.add_argument("path", type=Path, help="a .lora.arrow card")
    i.add_argument("--modules", action="store_true", help="also list every module")
    add_json_flag(i)
    i.set_defaults(func=run_inspect)

    c = verbs.add_parser("convert", help="convert between .lora.arrow v1/v2 and a PEFT directory")
    c.add_argument("src", type=Path, help="a .lora.arrow card or a PEFT adapter directory")
    c.add_argument("dst", type=Path, help="output card file, or directory for --to peft")
    c.add_argument("--to", choices=("v1", "v2", "peft"), default="v2", help="output format (default v2)")
    c.add_argument("--base-model", default=None,
                   help="base_model_name_or_path written into a PEFT adapter_config.json")
    add_json_flag(c)
    c.set_defaults(func=run_convert)


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def run_inspect(args: argparse.Namespace) -> int:
    from ..cards import LoRAFormat

    info = LoRAFormat.inspect(args.path)
    if args.json:
        print_json(info)
        return 0 if info["checksum"] != "mismatch" else 1
    c = console()
    status = {"ok": "[green]ok[/]", "mismatch": "[red]MISMATCH[/]",
              "absent": "absent (v1 has none)"}[info["checksum"]]
    c.print(f"[bold]{info['name']}[/]  ({info['path']})")
    c.print(f"format: v{info['version']}   naming: {info['naming']}   "
            f"base fingerprint: {info['base_fingerprint'] or '-'}")
    c.print(f"modules: {info['num_modules']}   rank: {info['rank']} (module ranks "
            f"{', '.join(map(str, info['ranks']))})   alpha: {info['alpha']}")
    c.print(f"dtypes: {', '.join(info['dtypes'])}   size: {_human_size(info['file_bytes'])} "
            f"(tensors {_human_size(info['tensor_bytes'])})")
    c.print(f"checksum: {status}")
    for k, v in info["metadata"].items():
        c.print(f"  {k}: {v if len(v) <= 100 else v[:97] + '...'}")
    if args.modules:
        # plain aligned lines rather than a table: full module names, easy to grep
        width = max(len(m["module"]) for m in info["modules"])
        c.print(f"  {'module':<{width}}  rank  alpha  dtype A/B          A x B")
        for m in info["modules"]:
            c.print(f"  {m['module']:<{width}}  {m['rank']:>4}  {m['alpha']:>5g}  "
                    f"{m['dtype_a'] + '/' + m['dtype_b']:<17}  "
                    f"{'x'.join(map(str, m['shape_a']))}, {'x'.join(map(str, m['shape_b']))}",
                    soft_wrap=True)
    return 0 if info["checksum"] != "mismatch" else 1


def run_convert(args: argparse.Namespace) -> int:
    from ..cards import LoRAFormat
    from ..interop.peft import from_peft, to_peft

    src_kind = "peft" if args.src.is_dir() else "card"
    card = from_peft(args.src) if src_kind == "peft" else LoRAFormat.load(args.src)
    if args.to == "peft":
        out = to_peft(card, args.dst, base_model_name_or_path=args.base_model)
    else:
        out = LoRAFormat.save(card, args.dst, version=int(args.to[1]))
    result = {"src": str(args.src), "src_format": src_kind, "dst": str(out), "to": args.to,
              "name": card.name, "modules": len(card.modules)}
    if args.json:
        print_json(result)
    else:
        console().print(f"wrote {out} ({args.to}, {len(card.modules)} modules) from {args.src}")
    return 0
