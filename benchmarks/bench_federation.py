"""Federation benchmarks, one run on 127.0.0.1, each figure beside its peer:

(a) fetch of a 20 MB card with every check on (streamed SHA-256 against the id, Ed25519
    signature of a trusted publisher, ``LoRAFormat.load(verify=True)``: bounds, checksum, NaN
    scan; manifest/card agreement, base-model fingerprint) against a raw Flight ``do_get`` of the
    same bytes from the same server with no checks (goal: >= 0.9x its throughput);
(b) SHA-256 of the same bytes in memory (the floor of any check of the id) and the checks alone
    on the file, to show where the time goes;
(c) time from ``publish`` on node A to the card usable on node B (scanned, fetched, checked,
    added to B's SkillLibrary and loaded), beside the raw transfer of that card.

    python -m pytest benchmarks/bench_federation.py --benchmark-only -q
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.flight as flight
import pytest
import torch

from aios_fast.cards import LoRACard, LoRAFormat
from aios_fast.federation.manager import FederationManager

TOKEN = "bench-token"
FP = "fp1:" + "44" * 16
RANK = 272   # 24 MiniLM attention modules x rank 272, float32: about 20 MB
RESULTS: dict[str, float] = {}

pytestmark = pytest.mark.usefixtures("one_thread")


def _card(path: Path, seed: int, rank: int = RANK) -> Path:
    g = torch.Generator().manual_seed(seed)
    keys = [f"encoder.layer.{i}.attention.{m}" for i in range(6)
            for m in ("self.query", "self.key", "self.value", "output.dense")]
    A = {k: torch.randn(rank, 384, generator=g) * 0.02 for k in keys}
    B = {k: torch.randn(384, rank, generator=g) * 0.02 for k in keys}
    card = LoRACard(f"bench{seed}", rank, 2.0 * rank, ["query", "key", "value", "dense"], A, B,
                    base_fingerprint=FP)
    return LoRAFormat.save(card, path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("fed-bench")
    a = FederationManager("alpha", 0, root / "A", token=TOKEN, discovery=False, base_fingerprint=FP).start()
    b = FederationManager("beta", 0, root / "B", token=TOKEN, discovery=False, base_fingerprint=FP,
                          peers=[a.location]).start()
    b.keyring.trust(a.key.public_hex, "alpha")
    path = _card(root / "big.lora.arrow", seed=0)
    m = a.publish(path, examples=["a benchmark skill"])
    assert 19e6 < m.size < 22e6, m.size
    yield a, b, m, path, root
    b.stop()
    a.stop()


def test_fetch_20mb_all_checks(benchmark, pair):
    a, b, m, path, root = pair
    remote = b.find_remote(m.id)

    def fetch():
        dest = b.fetch_skill(remote)
        return dest

    def cleanup(*_):
        (b.storage_dir / "fetched" / f"{m.id}.lora.arrow").unlink(missing_ok=True)
        return (), {}

    dest = benchmark.pedantic(fetch, setup=cleanup, rounds=8, warmup_rounds=1)
    assert dest.read_bytes() == path.read_bytes() and b.reports[-1]["ok"]
    RESULTS["checked"] = benchmark.stats.stats.median


def test_raw_do_get_same_bytes(benchmark, pair):
    a, b, m, path, root = pair
    client = flight.FlightClient(a.location)
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])

    def raw():
        return client.do_get(flight.Ticket(m.id.encode()), opts).read_all()

    table = benchmark.pedantic(raw, rounds=8, warmup_rounds=1)
    assert b"".join(v.as_py() for v in table.column(0)) == path.read_bytes()
    RESULTS["raw"] = benchmark.stats.stats.median
    client.close()


def test_sha256_floor(benchmark, pair):
    """SHA-256 of the 20 MB in memory: the least any fetch that checks the id must add."""
    import hashlib

    data = pair[3].read_bytes()
    digest = benchmark.pedantic(lambda: hashlib.sha256(data).hexdigest(), rounds=8, warmup_rounds=1)
    assert digest == pair[2].id
    RESULTS["sha256"] = benchmark.stats.stats.median


def test_checks_alone_no_network(benchmark, pair):
    """The quarantine's checks on the same 20 MB already on disk: SHA-256 of the file, trusted
    signature, ``LoRAFormat.load(verify=True)``, manifest agreement, base model."""
    import hashlib
    import shutil

    from aios_fast.federation.client import Fetched

    a, b, m, path, root = pair
    work = root / "checks"
    work.mkdir(exist_ok=True)

    def setup():
        dst = work / "c.lora.arrow"
        shutil.copyfile(path, dst)
        return (dst,), {}

    def check(dst):
        h = hashlib.sha256()
        with open(dst, "rb") as fh:
            while block := fh.read(4 << 20):
                h.update(block)
        return b.quarantine.check(Fetched(dst, h.hexdigest(), dst.stat().st_size, m))

    admitted = benchmark.pedantic(check, setup=setup, rounds=8, warmup_rounds=1)
    assert admitted.checks == ["size", "hash", "signature", "format", "base_model"]
    RESULTS["checks_alone"] = benchmark.stats.stats.median


def test_publish_to_usable_on_peer(benchmark, pair):
    from aios_fast.route.library import SkillLibrary

    a, b, _, _, root = pair
    lib = SkillLibrary(root / "B-library")
    cards = iter(_card(root / f"p{i}.lora.arrow", seed=100 + i, rank=16) for i in range(20))

    def publish_and_use():
        path = next(cards)
        m = a.publish(path, examples=["a fresh skill"], validation={"passed": True})
        entry = b.fetch_skill(m.id, library=lib)
        card = lib.load_card(entry)
        return path, entry, card

    path, entry, card = benchmark.pedantic(publish_and_use, rounds=6, warmup_rounds=1)
    assert Path(entry.path).read_bytes() == path.read_bytes() and entry.passed and card.rank == 16
    RESULTS["publish_to_usable"] = benchmark.stats.stats.median
    benchmark.extra_info["card_bytes"] = path.stat().st_size


@pytest.fixture(scope="module", autouse=True)
def report():
    """Print (and save as JSON) the ratios once the module's benchmarks have run."""
    yield
    r = dict(RESULTS)
    lines = []
    if {"checked", "raw"} <= r.keys():
        r["checked_over_raw_throughput"] = r["raw"] / r["checked"]
        lines.append(f"fetch 20 MB with all checks: {r['checked'] * 1e3:.1f} ms ({20 / r['checked']:.0f} MB/s); "
                     f"raw do_get: {r['raw'] * 1e3:.1f} ms ({20 / r['raw']:.0f} MB/s); "
                     f"checked = {r['checked_over_raw_throughput']:.2f}x raw throughput")
    if "sha256" in r:
        lines.append(f"SHA-256 of the 20 MB in memory: {r['sha256'] * 1e3:.1f} ms ({20 / r['sha256']:.0f} MB/s)")
    if "checks_alone" in r:
        lines.append(f"the checks alone on the file (no network): {r['checks_alone'] * 1e3:.1f} ms")
    if "publish_to_usable" in r:
        lines.append(f"publish on A -> usable on B: {r['publish_to_usable'] * 1e3:.1f} ms")
    if lines:
        print("\n" + "\n".join(lines))
        out = Path(os.environ.get("AIOS_FEDERATION_BENCH_SUMMARY", "/tmp/aios-sections/federation_summary.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2))
