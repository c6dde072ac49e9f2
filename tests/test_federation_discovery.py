"""zeroconf discovery between two nodes, each in its own network namespace joined by a veth
pair (multicast stays inside the test's private link). Skipped, with the reason, where
namespaces cannot be created (not root, no ``ip``, no CAP_NET_ADMIN)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

TOKEN = "netns-token"
FP = "fp1:" + "33" * 16

NODE = textwrap.dedent(r'''
    import json, sys, time
    from pathlib import Path
    import torch
    from aios_fast.cards import LoRACard, LoRAFormat
    from aios_fast.federation.manager import FederationManager

    role, host, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    def wait_for(pred, timeout):
        end = time.time() + timeout
        while time.time() < end:
            v = pred()
            if v:
                return v
            time.sleep(0.2)
        return None

    m = FederationManager(role, 0, work / role, token="%TOKEN%", discovery=True, host=host,
                          base_fingerprint="%FP%", discovery_expiry=6.0).start()
    out = {"node_id": m.node_id, "location": m.location, "problems": m.problems}
    if role == "alpha":
        g = torch.Generator().manual_seed(0)
        keys = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]
        card = LoRACard("kelp", 2, 4.0, ["query"], {k: torch.randn(2, 384, generator=g) for k in keys},
                        {k: torch.randn(384, 2, generator=g) for k in keys}, base_fingerprint="%FP%")
        LoRAFormat.save(card, work / "kelp.lora.arrow")
        out["manifest"] = m.publish(work / "kelp.lora.arrow", examples=["kelp forests"]).id
        (work / "alpha.key").write_text(m.key.public_hex)
        peers = wait_for(lambda: m.peers(), 20)
        out["peers"] = [p.node_id for p in peers or []]
        (work / "alpha.json").write_text(json.dumps(out))
        wait_for(lambda: (work / "stop-alpha").exists(), 60)
        m.stop()
    else:
        key = wait_for(lambda: (work / "alpha.key").exists() and (work / "alpha.key").read_text(), 30)
        m.keyring.trust(key, "alpha")
        peers = wait_for(lambda: m.peers(), 20)
        out["peers"] = [p.node_id for p in peers or []]
        out["peer_locations"] = [p.location for p in peers or []]
        if peers:
            got = m.fetch_skill("kelp")
            out["fetched_same_bytes"] = got.read_bytes() == (work / "kelp.lora.arrow").read_bytes()
            out["fetched_from"] = m.reports[-1]
        (work / "beta-found").write_text("1")
        t0 = time.time()
        gone = wait_for(lambda: not m.peers() and "gone", 30)
        out["alpha_gone_after_s"] = round(time.time() - t0, 1) if gone else None
        (work / "beta.json").write_text(json.dumps(out))
        m.stop()
''').replace("%TOKEN%", TOKEN).replace("%FP%", FP)


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def namespaces():
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` to create network namespaces")
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_NET_ADMIN) to create network namespaces")
    tag = f"{os.getpid() % 100000}"
    na, nb = f"aiosA{tag}", f"aiosB{tag}"
    va, vb = f"vfa{tag}", f"vfb{tag}"
    r = _ip("netns", "add", na)
    if r.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {r.stderr.strip()}")
    try:
        steps = [("netns", "add", nb),
                 ("link", "add", va, "type", "veth", "peer", "name", vb),
                 ("link", "set", va, "netns", na), ("link", "set", vb, "netns", nb),
                 ("-n", na, "addr", "add", "10.211.0.1/24", "dev", va),
                 ("-n", nb, "addr", "add", "10.211.0.2/24", "dev", vb),
                 ("-n", na, "link", "set", va, "up", "multicast", "on"),
                 ("-n", nb, "link", "set", vb, "up", "multicast", "on"),
                 ("-n", na, "link", "set", "lo", "up"), ("-n", nb, "link", "set", "lo", "up"),
                 ("-n", na, "route", "add", "224.0.0.0/4", "dev", va),
                 ("-n", nb, "route", "add", "224.0.0.0/4", "dev", vb)]
        for s in steps:
            r = _ip(*s)
            if r.returncode != 0:
                pytest.skip(f"cannot set up the namespaced link (ip {' '.join(s)}): {r.stderr.strip()}")
        yield na, nb
    finally:
        _ip("netns", "del", na)
        _ip("netns", "del", nb)


@pytest.mark.slow
def test_two_namespaced_nodes_discover_each_other_and_expire(namespaces, tmp_path):
    na, nb = namespaces
    script = tmp_path / "node.py"
    script.write_text(NODE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    procs = []
    try:
        for ns, role, ip in ((na, "alpha", "10.211.0.1"), (nb, "beta", "10.211.0.2")):
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(script), role, ip,
                                           str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        end = time.time() + 90
        while not (tmp_path / "beta-found").exists() and time.time() < end:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
        (tmp_path / "stop-alpha").write_text("1")
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    alpha = json.loads((tmp_path / "alpha.json").read_text())
    beta = json.loads((tmp_path / "beta.json").read_text())
    assert alpha["location"].startswith("grpc+tcp://10.211.0.1:")   # advertised, reachable
    assert beta["peers"] == [alpha["node_id"]]                      # found A, not itself
    assert alpha["peers"] == [beta["node_id"]]
    assert beta["peer_locations"] == [alpha["location"]]
    assert beta["fetched_same_bytes"] is True and beta["fetched_from"]["ok"]
    assert beta["alpha_gone_after_s"] is not None and beta["alpha_gone_after_s"] < 15
