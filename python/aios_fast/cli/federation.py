"""`aios-fast federation serve|peers|publish|fetch|list`: share skill cards with other nodes over
Arrow Flight (content-addressed, signed, authenticated; see ``aios_fast.federation``).

The bearer token comes from ``--token-file`` or ``$AIOS_FEDERATION_TOKEN`` (``--token`` works
too, but shows in the process list).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from ._common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federation", help="serve, publish, list and fetch skills between nodes")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    s = verbs.add_parser("serve", help="run this node's Flight server (Ctrl-C to stop)")
    s.add_argument("--storage", type=Path, required=True, help="store / quarantine directory")
    s.add_argument("--name", default="node", help="node name")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8815, help="Flight port (0: any free port)")
    s.add_argument("--advertise", default=None, help="address announced to peers")
    s.add_argument("--peer", action="append", default=[], help="static peer host:port (repeatable)")
    s.add_argument("--no-discovery", action="store_true", help="no zeroconf announce/browse")
    s.add_argument("--publish", action="append", default=[], type=Path, help="card to serve (repeatable)")
    s.add_argument("--for", dest="duration", type=float, default=None, help="stop after N seconds")
    _auth(s)
    _tls(s, server=True)
    add_json_flag(s)
    s.set_defaults(func=_serve)

    pe = verbs.add_parser("peers", help="static and discovered peers, with their health")
    pe.add_argument("--peer", action="append", default=[], help="static peer host:port (repeatable)")
    pe.add_argument("--discover", type=float, default=0.0, metavar="SECONDS",
                    help="browse zeroconf for this long first")
    pe.add_argument("--storage", type=Path, default=None, help="node directory (default: a temporary one)")
    _auth(pe)
    _tls(pe, server=False)
    add_json_flag(pe)
    pe.set_defaults(func=_peers)

    pu = verbs.add_parser("publish", help="sign a card with your key and upload it to a server")
    pu.add_argument("card", type=Path, help="a .lora.arrow card")
    pu.add_argument("--to", required=True, help="server host:port or grpc+tcp:// / grpc+tls:// URI")
    pu.add_argument("--example", action="append", default=[], help="an example text (repeatable)")
    pu.add_argument("--examples-file", type=Path, default=None, help="one example text per line")
    pu.add_argument("--description", default=None)
    pu.add_argument("--version", dest="skill_version", type=int, default=1)
    _auth(pu)
    _tls(pu, server=False)
    add_json_flag(pu)
    pu.set_defaults(func=_publish)

    ls = verbs.add_parser("list", help="manifests a server offers")
    ls.add_argument("--from", dest="source", required=True, help="server host:port or URI")
    ls.add_argument("--base-fingerprint", default=None, help="only cards for this base model")
    _auth(ls)
    _tls(ls, server=False)
    add_json_flag(ls)
    ls.set_defaults(func=_list)

    f = verbs.add_parser("fetch", help="fetch a card through quarantine (hash, trust, format, base model)")
    f.add_argument("skill", help="skill name or card id")
    f.add_argument("--from", dest="source", required=True, help="server host:port or URI")
    f.add_argument("--storage", type=Path, required=True, help="this node's federation directory")
    f.add_argument("--library", type=Path, default=None, help="add the card to this skill library")
    f.add_argument("--base-fingerprint", default=None, help="this node's model fingerprint (checked)")
    _auth(f)
    _tls(f, server=False)
    add_json_flag(f)
    f.set_defaults(func=_fetch)


def _auth(q: argparse.ArgumentParser) -> None:
    q.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token")
    q.add_argument("--token", default=None, help="bearer token (prefer --token-file or $AIOS_FEDERATION_TOKEN)")
    q.add_argument("--keyring", type=Path, default=None, help="keyring directory (default ~/.aios/keys)")


def _tls(q: argparse.ArgumentParser, server: bool) -> None:
    q.add_argument("--tls-ca", default=None, help="CA certificate (PEM) that signed the peers")
    q.add_argument("--tls-cert", default=None, help="this node's certificate (PEM)")
    q.add_argument("--tls-key", default=None, help="this node's private key (PEM)")
    if server:
        q.add_argument("--tls-client-ca", default=None, help="require client certificates from this CA (mTLS)")


def _token(args) -> str | None:
    from ..errors import InputError

    if args.token_file is not None:
        try:
            return args.token_file.read_text().strip() or None
        except OSError as exc:
            raise InputError(f"--token-file {args.token_file}: {exc.strerror}") from None
    return args.token or os.environ.get("AIOS_FEDERATION_TOKEN") or None


def _tls_config(args):
    from ..federation.tls import TLSConfig

    vals = dict(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca,
                client_ca=getattr(args, "tls_client_ca", None))
    return TLSConfig(**vals) if any(vals.values()) else None


def _keyring(args):
    from ..federation.trust import default_keyring_dir

    return args.keyring if args.keyring is not None else default_keyring_dir()


def _client(args, location: str):
    from ..federation.client import FederationClient

    return FederationClient(location, _token(args), tls=_tls_config(args))


def _manifest_row(m) -> dict:
    return {"id": m.id, "name": m.name, "version": m.version, "description": m.description,
            "examples": len(m.examples), "base_fingerprint": m.base_fingerprint, "size": m.size,
            "publisher": m.publisher, "passed": (m.validation or {}).get("passed")}


def _serve(args) -> int:
    from ..federation.manager import FederationManager

    mgr = FederationManager(args.name, args.port, args.storage, token=_token(args), peers=args.peer,
                            discovery=not args.no_discovery, host=args.host, advertise=args.advertise,
                            keyring=_keyring(args), tls=_tls_config(args)).start()
    try:
        published = [mgr.publish(p).id for p in args.publish]
        info = {"node_id": mgr.node_id, "location": mgr.location, "key_id": mgr.key_id,
                "public_key": mgr.key.public_hex, "cards": len(mgr.store), "published": published,
                "read_only": not _token(args), "problems": mgr.problems}
        if args.json:
            print(json.dumps(info), flush=True)
        else:
            console().print(f"serving {info['cards']} card(s) at {mgr.location} as {mgr.node_id} "
                            f"(key {mgr.key_id}){' read-only: no token' if info['read_only'] else ''}")
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *a: stop.set())
        try:
            stop.wait(args.duration)
        except KeyboardInterrupt:
            pass
    finally:
        mgr.stop()
    return 0


def _peers(args) -> int:
    import tempfile

    from ..federation.manager import FederationManager

    with tempfile.TemporaryDirectory() as tmp:
        mgr = FederationManager("peers-cli", 0, args.storage or tmp, token=_token(args), peers=args.peer,
                                discovery=args.discover > 0, keyring=args.keyring or Path(tmp) / "keys",
                                tls=_tls_config(args)).start()
        try:
            if args.discover > 0:
                time.sleep(args.discover)
            rows = []
            for p in mgr.peers():
                row = {"location": p.location, "node_id": p.node_id, "discovered": p.discovered}
                try:
                    h = mgr.client(p).health()
                    row.update(status="ok", node_id=h.get("node_id") or p.node_id,
                               key_id=h.get("key_id"), cards=h.get("cards"))
                except Exception as exc:  # noqa: BLE001 - report any peer failure as a row
                    row.update(status="unreachable", error=str(exc)[:200])
                rows.append(row)
        finally:
            mgr.stop()
    if args.json:
        print_json(rows)
    else:
        c = console()
        if not rows:
            c.print("no peers (give --peer host:port, or --discover SECONDS on a multicast network)")
        for r in rows:
            c.print(f"{r['location']}  {r['status']}  {r.get('node_id', '')}  cards={r.get('cards', '-')}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def _publish(args) -> int:
    from ..federation.manifest import Manifest
    from ..federation.trust import Keyring

    examples = list(args.example)
    if args.examples_file is not None:
        examples += [line.strip() for line in args.examples_file.read_text().splitlines() if line.strip()]
    key = Keyring(args.keyring).signing_key()
    m = Manifest.for_card(args.card, key, examples=examples, description=args.description,
                          version=args.skill_version)
    with _client(args, args.to) as c:
        ack = c.publish(args.card, m)
    out = {**_manifest_row(m), "stored": ack.get("stored"), "to": c.location}
    if args.json:
        print_json(out)
    else:
        console().print(f"published {m.name} v{m.version} ({m.id}) to {c.location}"
                        f"{'' if ack.get('stored') else ' (already there)'}")
    return 0


def _list(args) -> int:
    with _client(args, args.source) as c:
        ms = c.list(base_fingerprint=args.base_fingerprint)
        problems = list(c.problems)
    rows = [_manifest_row(m) for m in ms]
    if args.json:
        print_json({"from": args.source, "cards": rows, "problems": problems})
    else:
        con = console()
        for r in rows:
            con.print(f"{r['id'][:16]}  {r['name']} v{r['version']}  {r['size']} B  publisher {r['publisher']}"
                      f"  passed={r['passed']}")
        for p in problems:
            con.print(f"[yellow]skipped:[/] {p}")
    return 0


def _fetch(args) -> int:
    from ..federation.errors import QuarantineError
    from ..federation.manager import FederationManager

    library = None
    if args.library is not None:
        from ..route.library import SkillLibrary

        library = SkillLibrary(args.library)
    mgr = FederationManager("fetch-cli", 0, args.storage, token=_token(args), peers=[args.source],
                            discovery=False, keyring=_keyring(args), base_fingerprint=args.base_fingerprint,
                            library=library, tls=_tls_config(args))
    try:
        result = mgr.fetch_skill(args.skill)
    except QuarantineError as exc:
        out = {"ok": False, "check": exc.check, "reason": str(exc)}
        if args.json:
            print_json(out)
        else:
            console().print(f"[red]refused[/] at check {exc.check!r}: {exc}")
        return 1
    finally:
        mgr.stop()
    out = {"ok": True, "reason": mgr.reports[-1]["reason"] if mgr.reports else "already in the library"}
    if library is not None:
        out.update(entry=result.to_dict())
    else:
        out.update(path=str(result))
    if args.json:
        print_json(out)
    else:
        console().print(f"fetched {args.skill}: {out.get('path') or out['entry']['key']} ({out['reason']})")
    return 0
