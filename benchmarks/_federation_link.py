"""The checked fetch against a raw Flight ``do_get`` over a loopback shaped to a LAN's rate.

Run by ``bench_federation.py`` as ``unshare -n python _federation_link.py RATE ROUNDS`` (as root):
the new network namespace has a loopback of its own, which this script brings up and shapes with
the kernel's token-bucket filter (``tc qdisc ... tbf rate RATE``), so the two nodes talk over
127.0.0.1 at a real link's rate without touching the host's network. The raw and the checked
fetch alternate, round after round; one JSON line with both series goes to standard output.

Unshaped loopback on a small machine measures CPU, not transfer: both sides of both peers share
the same cores. A shaped link is what the fetch meets between two machines, where the checks
run while the bytes arrive (``FederationClient.fetch`` hashes and writes each chunk on a worker).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import pyarrow.flight as flight
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_federation import CANNOT_SHAPE, FP, TOKEN, _card  # noqa: E402

from aios_fast.federation.manager import FederationManager  # noqa: E402

_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def _bits_per_second(rate: str) -> float:
    for unit, scale in _UNITS.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise SystemExit(f"rate {rate!r}: expected a number followed by kbit, mbit or gbit (e.g. 1gbit)")


def shape_loopback(rate: str) -> None:
    """Bring this namespace's loopback up and cap it at ``rate``. The bucket holds 1 ms of
    traffic (at least 128 KiB: two of the loopback's 64 KiB segments), so a transfer cannot start
    with a burst that hides the rate."""
    burst = max(int(_bits_per_second(rate) / 8 / 1000), 1 << 17)
    for cmd in (["ip", "link", "set", "lo", "up"],
                ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate,
                 "burst", str(burst), "latency", "100ms"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # e.g. a kernel without sch_tbf: the caller skips, with this
            print(f"cannot shape the loopback: {' '.join(cmd)}: {done.stderr.strip()}", file=sys.stderr)
            raise SystemExit(CANNOT_SHAPE)


def measure(rate: str, rounds: int) -> dict:
    shape_loopback(rate)
    torch.set_num_threads(1)
    with TemporaryDirectory(prefix="aios-fed-link-") as tmp:
        root = Path(tmp)
        a = FederationManager("alpha", 0, root / "A", token=TOKEN, discovery=False,
                              base_fingerprint=FP).start()
        b = FederationManager("beta", 0, root / "B", token=TOKEN, discovery=False,
                              base_fingerprint=FP, peers=[a.location]).start()
        try:
            b.keyring.trust(a.key.public_hex, "alpha")
            path = _card(root / "big.lora.arrow", seed=0)
            m = a.publish(path, examples=["a benchmark skill"])
            remote = b.find_remote(m.id)
            kept = b.storage_dir / "fetched" / f"{m.id}.lora.arrow"
            client = flight.FlightClient(a.location)
            opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
            out: dict = {}

            def raw():
                out["raw"] = client.do_get(flight.Ticket(m.id.encode()), opts).read_all()

            def checked():
                kept.unlink(missing_ok=True)
                out["checked"] = b.fetch_skill(remote)

            peers = {"raw": raw, "checked": checked}
            series: dict[str, list[float]] = {k: [] for k in peers}
            for r in range(rounds + 1):                # round 0 warms both up
                order = list(peers) if r % 2 else list(peers)[::-1]
                for name in order:
                    t = time.perf_counter()
                    peers[name]()
                    if r:
                        series[name].append(time.perf_counter() - t)
            client.close()
            data = path.read_bytes()
            if out["checked"].read_bytes() != data or not b.reports[-1]["ok"]:
                raise SystemExit("the checked fetch did not keep the published bytes")
            if b"".join(v.as_py() for v in out["raw"].column(0)) != data:
                raise SystemExit("the raw do_get did not return the published bytes")
            return {"rate": rate, "bytes": len(data), "series_s": series, "cpus": os.cpu_count()}
        finally:
            b.stop()
            a.stop()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: unshare -n python _federation_link.py RATE ROUNDS")
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]))))
