"""`aios-fast keys create|list|trust|revoke|export`: the node's Ed25519 keys and the publishers it
trusts (the federation's keyring; default ``$AIOS_KEYRING`` or ``~/.aios/keys``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="create, list, trust and revoke federation signing keys")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--keyring", type=Path, default=None,
                       help="keyring directory (default $AIOS_KEYRING or ~/.aios/keys)")
        add_json_flag(q)

    c = verbs.add_parser("create", help="generate this node's Ed25519 key pair (private key 0600)")
    c.add_argument("--name", default="node", help="a label for the key")
    common(c)
    c.set_defaults(func=_create)

    ls = verbs.add_parser("list", help="every key: id, name, status, own or peer")
    common(ls)
    ls.set_defaults(func=_list)

    t = verbs.add_parser("trust", help="trust a publisher's public key (64 hex, or a PEM file)")
    t.add_argument("public_key", help="64 hex characters, or a file holding them or a PEM")
    t.add_argument("--name", default="peer", help="a label for the publisher")
    t.add_argument("--force", action="store_true", help="trust again a key that was revoked")
    common(t)
    t.set_defaults(func=_trust)

    r = verbs.add_parser("revoke", help="refuse a key's signatures from now on")
    r.add_argument("key_id", help="the key's id (see `keys list`)")
    common(r)
    r.set_defaults(func=_revoke)

    e = verbs.add_parser("export", help="print a public key (default: this node's) to give to peers")
    e.add_argument("key_id", nargs="?", default=None)
    common(e)
    e.set_defaults(func=_export)


def _ring(args):
    from ..federation.trust import Keyring

    return Keyring(args.keyring)


def _row(k) -> dict:
    return {"key_id": k.key_id, "name": k.name, "status": k.status, "own": k.own,
            "public_key": k.public_key, "added": k.added}


def _create(args) -> int:
    ring = _ring(args)
    key = ring.create_key(args.name)
    out = {"key_id": key.key_id, "public_key": key.public_hex, "keyring": str(ring.directory)}
    if args.json:
        print_json(out)
    else:
        console().print(f"created key {key.key_id} ({args.name}) in {ring.directory}\n"
                        f"public key (give this to peers): {key.public_hex}")
    return 0


def _list(args) -> int:
    rows = [_row(k) for k in _ring(args).list()]
    if args.json:
        print_json(rows)
        return 0
    c = console()
    if not rows:
        c.print("no keys; create one with `aios-fast keys create`")
    for r in rows:
        c.print(f"{r['key_id']}  {r['status']:<9}  {'own ' if r['own'] else 'peer'}  {r['name']}")
    return 0


def _trust(args) -> int:
    value = args.public_key
    p = Path(value)
    if len(value) != 64 and p.is_file():
        value = p.read_text()
    kid = _ring(args).trust(value, args.name, force=args.force)
    if args.json:
        print_json({"key_id": kid, "name": args.name, "status": "trusted"})
    else:
        console().print(f"trusting {kid} ({args.name})")
    return 0


def _revoke(args) -> int:
    _ring(args).revoke(args.key_id)
    if args.json:
        print_json({"key_id": args.key_id, "status": "revoked"})
    else:
        console().print(f"revoked {args.key_id}")
    return 0


def _export(args) -> int:
    ring = _ring(args)
    kid = args.key_id or ring.signing_key().key_id
    pub = ring.public_hex(kid)
    if args.json:
        print_json({"key_id": kid, "public_key": pub})
    else:
        print(pub)
    return 0
