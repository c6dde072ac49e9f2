"""`aios-fast keys ...` and `aios-fast federation serve|peers|publish|list|fetch`: a real server
process on 127.0.0.1, the other commands run in process against it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aios_fast.cli import main

from test_federation import FP_NODE, make_card

TOKEN = "cli-token"


def run_json(capsys, *argv) -> tuple[int, object]:
    rc = main(list(argv) + ["--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip() else None


def test_keys_commands(tmp_path, capsys):
    ring = str(tmp_path / "ring")
    rc, made = run_json(capsys, "keys", "create", "--name", "me", "--keyring", ring)
    assert rc == 0 and len(made["key_id"]) == 32 and len(made["public_key"]) == 64
    other = tmp_path / "other.pub"
    rc, theirs = run_json(capsys, "keys", "create", "--keyring", str(tmp_path / "ring2"))
    other.write_text(theirs["public_key"])
    rc, t = run_json(capsys, "keys", "trust", str(other), "--name", "them", "--keyring", ring)
    assert rc == 0 and t["key_id"] == theirs["key_id"]
    rc, rows = run_json(capsys, "keys", "list", "--keyring", ring)
    assert {(r["name"], r["status"], r["own"]) for r in rows} == {("me", "trusted", True), ("them", "trusted", False)}
    rc, _ = run_json(capsys, "keys", "revoke", theirs["key_id"], "--keyring", ring)
    rc, rows = run_json(capsys, "keys", "list", "--keyring", ring)
    assert {r["name"]: r["status"] for r in rows}["them"] == "revoked"
    assert main(["keys", "revoke", "0" * 32, "--keyring", ring]) == 1
    assert "has no key" in capsys.readouterr().err
    assert main(["keys", "trust", "not-a-key", "--keyring", ring]) == 1
    assert "32 raw bytes, 64 hex" in capsys.readouterr().err


@pytest.mark.slow
def test_federation_serve_publish_list_fetch(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    served = make_card(tmp_path / "served.lora.arrow", name="served")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aios_fast.cli", "federation", "serve", "--storage", str(tmp_path / "srv"),
         "--name", "server", "--port", "0", "--no-discovery", "--token-file", str(token_file),
         "--keyring", str(tmp_path / "srv-keys"), "--publish", str(served), "--for", "120", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(proc.stdout.readline())
        loc = info["location"]
        assert loc.startswith("grpc+tcp://127.0.0.1:") and len(info["published"]) == 1
        rc, peers = run_json(capsys, "federation", "peers", "--peer", loc, "--token-file", str(token_file))
        assert rc == 0 and peers[0]["status"] == "ok" and peers[0]["cards"] == 1
        rc, _ = run_json(capsys, "keys", "create", "--keyring", str(tmp_path / "me"))
        mine = make_card(tmp_path / "mine.lora.arrow", name="mine", seed=1)
        rc, pub = run_json(capsys, "federation", "publish", str(mine), "--to", loc, "--token-file",
                           str(token_file), "--keyring", str(tmp_path / "me"), "--example", "what is mine?")
        assert rc == 0 and pub["stored"] is True and pub["name"] == "mine"
        assert main(["federation", "publish", str(mine), "--to", loc, "--token", "wrong",
                     "--keyring", str(tmp_path / "me")]) == 1
        assert "bearer token" in capsys.readouterr().err
        rc, listed = run_json(capsys, "federation", "list", "--from", loc, "--token-file", str(token_file),
                              "--base-fingerprint", FP_NODE)
        assert {c["name"] for c in listed["cards"]} == {"served", "mine"}
        # the fetching node trusts only its own key (which signed "mine"), not the server's
        rc, got = run_json(capsys, "federation", "fetch", "mine", "--from", loc, "--storage", str(tmp_path / "f"),
                           "--keyring", str(tmp_path / "me"), "--token-file", str(token_file),
                           "--base-fingerprint", FP_NODE, "--library", str(tmp_path / "lib"))
        assert rc == 0 and got["ok"] and got["entry"]["origin"] == "peer"
        assert Path(got["entry"]["path"]).read_bytes() == mine.read_bytes()
        # "served" is signed by the server's key, which this keyring does not trust: not offered
        rc, _ = run_json(capsys, "federation", "fetch", "served", "--from", loc, "--storage", str(tmp_path / "f"),
                         "--keyring", str(tmp_path / "me"), "--token-file", str(token_file))
        assert rc == 1
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
