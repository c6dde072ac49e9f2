"""Federation benchmarks, one run on 127.0.0.1, each figure beside its peer:

(a) fetch of a 20 MB card with every check on (SHA-256 of the stream against the id, Ed25519
    signature of a trusted publisher, the card reader's hostile-input checks and NaN scan,
    manifest/card agreement, base-model fingerprint; then kept durably: fsync, rename) against a
    raw Flight ``do_get`` of the same bytes from the same server, through a connection of its
    own in the same process, with no checks and nothing written (goal: >= 0.9x its throughput).
    The two run interleaved, round after round in a rotating order, with a third peer: the raw
    ``do_get`` written durably to a file (no checks), which separates what storing costs from
    what checking costs. The ratio is taken per round (the load of a shared machine changes
    from second to second) and reported as median, quartiles and range, with the load average;
(b) SHA-256 of the same bytes in memory (the floor of any check of the id), the checks alone
    on the file, and the checked fetch stage by stage, to show where the time goes;
(c) time from ``publish`` on node A to the card usable on node B (scanned, fetched, checked,
    added to B's SkillLibrary and loaded), beside the raw transfer of that card;
(d) (a)'s checked fetch and raw ``do_get`` again, over a loopback shaped to a link's rate (1, 2.5
    and 10 Gbit/s; ``AIOS_FEDERATION_LINK_RATES``) by the kernel's token-bucket filter in a network
    namespace of its own (``_federation_link.py``; needs root for ``unshare -n`` and ``tc``,
    skipped with the reason otherwise): the ratio a fetch between two machines meets.

    python -m pytest benchmarks/bench_federation.py --benchmark-only -q -s

The per-round ratios of (a) and (d) are drawn in docs/img/federation_bench.png.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.flight as flight
import pytest
import torch

from aios_fast._atomic import fsync_dir, save_figure
from aios_fast.cards import LoRACard, LoRAFormat
from aios_fast.federation.manager import FederationManager

TOKEN = "bench-token"
FP = "fp1:" + "44" * 16
RANK = 272   # 24 MiniLM attention modules x rank 272, float32: about 20 MB
ROUNDS = int(os.environ.get("AIOS_FEDERATION_BENCH_ROUNDS", "12"))
LINK_RATES = [r for r in os.environ.get("AIOS_FEDERATION_LINK_RATES", "1gbit,2500mbit,10gbit").split(",") if r]
RESULTS: dict[str, object] = {}
CANNOT_SHAPE = 77  # _federation_link.py's exit status when this machine cannot shape a loopback
PNG = Path(__file__).resolve().parents[1] / "docs" / "img" / "federation_bench.png"

pytestmark = pytest.mark.usefixtures("one_thread")



def _after_warmup(xs):
    """Median without the warm-up round (with --benchmark-disable there is only one round)."""
    return statistics.median(xs[1:] or xs)


def _bench_median(benchmark):
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None


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


def test_fetch_20mb_all_checks_vs_raw(benchmark, pair):
    """One benchmark round = the three peers once each, in a rotating order; the table's time is
    that round's, the figures that matter are the per-peer series kept in RESULTS."""
    a, b, m, path, root = pair
    remote = b.find_remote(m.id)
    client = flight.FlightClient(a.location)
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
    kept = b.storage_dir / "fetched" / f"{m.id}.lora.arrow"
    work = root / "raw-file"
    work.mkdir(exist_ok=True)
    out: dict[str, object] = {}

    def raw():
        out["raw"] = client.do_get(flight.Ticket(m.id.encode()), opts).read_all()

    def raw_to_file():
        tmp = work / "card.part"
        with open(tmp, "wb") as fh:
            for chunk in client.do_get(flight.Ticket(m.id.encode()), opts):
                for value in chunk.data.column(0):
                    fh.write(value.as_buffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, work / "card.lora.arrow")
        fsync_dir(work)

    def checked():
        out["checked"] = b.fetch_skill(remote)

    peers = {"raw": raw, "raw_to_file": raw_to_file, "checked": checked}
    leaves = {"raw_to_file": work / "card.lora.arrow", "checked": kept}
    series: dict[str, list[float]] = {k: [] for k in peers}
    # CPU time of the whole process (server and client threads both): when the machine's CPUs
    # are saturated, wall time follows it and raw / checked CPU bounds the ratio
    cpu: dict[str, list[float]] = {k: [] for k in peers}
    loads: list[float] = []
    state = {"round": 0}

    def one_round():
        names = list(peers)
        k = state["round"] % len(names)
        for name in names[k:] + names[:k]:
            if name in leaves:                    # deleting 20 MB is not part of any peer
                leaves[name].unlink(missing_ok=True)
            t, c = time.perf_counter(), time.process_time()
            peers[name]()
            series[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
        loads.append(os.getloadavg()[0])
        state["round"] += 1

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1)
    client.close()
    data = path.read_bytes()
    assert out["checked"].read_bytes() == data and b.reports[-1]["ok"]
    assert b"".join(v.as_py() for v in out["raw"].column(0)) == data
    assert (work / "card.lora.arrow").read_bytes() == data
    for v in (*series.values(), *cpu.values()):
        if len(v) > 1:                            # --benchmark-disable runs one round only
            del v[0]                              # the warm-up round
    ratios = sorted(r / c for r, c in zip(series["raw"], series["checked"]))
    ratios_file = sorted(r / c for r, c in zip(series["raw_to_file"], series["checked"]))
    RESULTS.update({
        "checked": statistics.median(series["checked"]), "raw": statistics.median(series["raw"]),
        "raw_to_file": statistics.median(series["raw_to_file"]),
        "checked_over_raw_throughput": statistics.median(ratios),
        "checked_over_raw_quartiles": _quartiles(ratios), "checked_over_raw_range": [ratios[0], ratios[-1]],
        "checked_over_raw_to_file_throughput": statistics.median(ratios_file),
        "checked_over_raw_to_file_range": [ratios_file[0], ratios_file[-1]],
        "rounds": len(ratios), "load_average_1min": [min(loads), max(loads)],
        "cpu": {k: statistics.median(v) for k, v in cpu.items()}, "series_s": series})
    benchmark.extra_info.update({k: RESULTS[k] for k in (
        "checked", "raw", "raw_to_file", "checked_over_raw_throughput", "checked_over_raw_range",
        "load_average_1min")})


def test_fetch_stages(benchmark, pair):
    """The checked fetch cut into its stages (run one after the other here, so the fsync does
    not overlap the checks as it does in ``fetch_skill``): stream + SHA-256 + write into
    quarantine, the quarantine's checks, fsync + rename + directory fsync."""
    a, b, m, path, root = pair
    remote = b.find_remote(m.id)
    kept = b.storage_dir / "fetched" / f"{m.id}.lora.arrow"
    stages: dict[str, list[float]] = {"stream_hash_write": [], "checks": [], "durable_rename": []}

    def staged():
        kept.unlink(missing_ok=True)
        t0 = time.perf_counter()
        fetched = b.client(remote.peer).fetch(m, b.quarantine.directory)
        t1 = time.perf_counter()
        admitted = b.quarantine.check(fetched)
        t2 = time.perf_counter()
        dest = b._admit(admitted, remote, None)
        t3 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[k].append(v)
        return dest

    dest = benchmark.pedantic(staged, rounds=ROUNDS // 2, warmup_rounds=1)
    assert dest.read_bytes() == path.read_bytes()
    RESULTS["stages"] = {k: _after_warmup(v) for k, v in stages.items()}


def test_sha256_floor(benchmark, pair):
    """SHA-256 of the 20 MB in memory: the least any fetch that checks the id must add. Its CPU
    time is kept too: on a loaded machine the wall time measures the share of a CPU it got
    (hashlib is OpenSSL's SHA-256, which uses the SHA extensions where the CPU has them)."""
    import hashlib

    data = pair[3].read_bytes()
    cpu: list[float] = []

    def sha():
        c = time.process_time()
        digest = hashlib.sha256(data).hexdigest()
        cpu.append(time.process_time() - c)
        return digest

    digest = benchmark.pedantic(sha, rounds=8, warmup_rounds=1)
    assert digest == pair[2].id
    if _bench_median(benchmark) is not None:   # None with --benchmark-disable
        RESULTS["sha256"] = _bench_median(benchmark)
    RESULTS["sha256_cpu"] = _after_warmup(cpu)


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
    if _bench_median(benchmark) is not None:   # None with --benchmark-disable
        RESULTS["checks_alone"] = _bench_median(benchmark)


def test_publish_to_usable_on_peer(benchmark, pair):
    from aios_fast.route.library import SkillLibrary

    a, b, _, _, root = pair
    lib = SkillLibrary(root / "B-library")
    rounds = 6
    # made before timing: writing the card is not part of publishing it
    cards = iter([_card(root / f"p{i}.lora.arrow", seed=100 + i, rank=16) for i in range(rounds + 1)])

    calls = []

    def publish_and_use():
        calls.append(1)
        path = next(cards)
        m = a.publish(path, examples=["a fresh skill"], validation={"passed": True})
        entry = b.fetch_skill(m.id, library=lib)
        card = lib.load_card(entry)
        return path, entry, card, m

    path, entry, card, m = benchmark.pedantic(publish_and_use, rounds=rounds, warmup_rounds=1)
    assert Path(entry.path).read_bytes() == path.read_bytes() and entry.passed and card.rank == 16
    assert len(lib.names()) == len(calls)         # rounds + 1, or 1 with --benchmark-disable
    client = flight.FlightClient(a.location)
    opts = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {TOKEN}".encode())])
    raw = []
    for _ in range(rounds + 1):
        t = time.perf_counter()
        client.do_get(flight.Ticket(m.id.encode()), opts).read_all()
        raw.append(time.perf_counter() - t)
    client.close()
    if _bench_median(benchmark) is not None:   # None with --benchmark-disable
        RESULTS["publish_to_usable"] = _bench_median(benchmark)
    RESULTS["publish_to_usable_raw_transfer"] = _after_warmup(raw)
    RESULTS["publish_to_usable_card_bytes"] = path.stat().st_size
    benchmark.extra_info["card_bytes"] = path.stat().st_size


@pytest.mark.parametrize("rate", LINK_RATES)
def test_fetch_over_shaped_link(benchmark, rate):
    """One child process in a network namespace of its own runs (a)'s raw and checked fetch,
    alternating, over its loopback capped at ``rate``; the benchmark's time is the whole child
    (node start-up included), the figures are the per-round series it reports."""
    unshare, tc = shutil.which("unshare"), shutil.which("tc")
    if os.geteuid() != 0 or unshare is None or tc is None:
        pytest.skip("shaping a loopback needs root with unshare and tc (iproute2)")
    script = Path(__file__).with_name("_federation_link.py")
    cmd = [unshare, "-n", sys.executable, str(script), rate, str(ROUNDS)]

    def child():
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)

    proc = benchmark.pedantic(child, rounds=1, iterations=1)
    if proc.returncode == CANNOT_SHAPE or (proc.returncode != 0 and "unshare failed" in proc.stderr):
        pytest.skip(f"cannot shape a loopback in a network namespace here: {proc.stderr.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    raw, checked = r["series_s"]["raw"], r["series_s"]["checked"]
    ratios = sorted(a / b for a, b in zip(raw, checked))
    mb = r["bytes"] / 1e6
    RESULTS.setdefault("link", {})[rate] = {
        "raw": statistics.median(raw), "checked": statistics.median(checked),
        "raw_mb_s": mb / statistics.median(raw), "checked_mb_s": mb / statistics.median(checked),
        "checked_over_raw_throughput": statistics.median(ratios),
        "checked_over_raw_quartiles": _quartiles(ratios), "checked_over_raw_range": [ratios[0], ratios[-1]],
        "rounds": len(ratios), "series_s": r["series_s"]}
    benchmark.extra_info.update({k: RESULTS["link"][rate][k] for k in (
        "raw", "checked", "checked_over_raw_throughput", "checked_over_raw_range")})


def _plot(r: dict) -> None:
    """Per-round checked / raw throughput ratios: unshaped loopback, then each shaped link."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    if "series_s" in r:
        runs.append(("127.0.0.1\nunshaped", r["series_s"]))
    for rate, x in r.get("link", {}).items():
        runs.append((f"127.0.0.1\nshaped {rate}", x["series_s"]))
    if not runs or min(len(s["raw"]) for _, s in runs) < 3:  # a smoke run (--benchmark-disable)
        return
    ratios = [[a / b for a, b in zip(s["raw"], s["checked"])] for _, s in runs]
    fig, ax = plt.subplots(figsize=(1.9 * len(runs) + 2, 3.8))
    ax.boxplot(ratios, whis=(0, 100))
    for i, rs in enumerate(ratios, start=1):
        ax.scatter([i] * len(rs), rs, s=10, alpha=0.5, color="#2a7ab0", zorder=3)
    ax.set_xticks(range(1, len(runs) + 1), [name for name, _ in runs], fontsize=8)
    ax.axhline(0.9, color="#c0392b", ls="--", lw=1, label="goal 0.9x")
    ax.axhline(1.0, color="#999999", lw=0.8)
    ax.set_ylabel("checked fetch / raw do_get throughput")
    ax.set_title(f"20 MB card, every check on, per interleaved round ({os.cpu_count()} CPUs)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, PNG, dpi=110)


def _quartiles(xs: list[float]) -> list[float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else xs * 3
    return [q[0], q[2]]


@pytest.fixture(scope="module", autouse=True)
def report():
    """Print (and save as JSON) the ratios once the module's benchmarks have run."""
    yield
    r = dict(RESULTS)
    lines = []
    if "checked_over_raw_throughput" in r:
        (q1, q3), (lo, hi) = r["checked_over_raw_quartiles"], r["checked_over_raw_range"]
        la, lb = r["load_average_1min"]
        lines.append(f"fetch 20 MB with all checks: {r['checked'] * 1e3:.1f} ms ({20 / r['checked']:.0f} MB/s); "
                     f"raw do_get: {r['raw'] * 1e3:.1f} ms ({20 / r['raw']:.0f} MB/s); raw do_get written "
                     f"durably: {r['raw_to_file'] * 1e3:.1f} ms (medians of {r['rounds']} interleaved rounds)")
        lines.append(f"checked / raw throughput, per round: median {r['checked_over_raw_throughput']:.2f}x, "
                     f"quartiles {q1:.2f}-{q3:.2f}, range {lo:.2f}-{hi:.2f}; checked / raw-to-file: median "
                     f"{r['checked_over_raw_to_file_throughput']:.2f}x; load average {la:.1f}-{lb:.1f} "
                     f"on {os.cpu_count()} CPUs")
        c = r["cpu"]
        lines.append(f"process CPU per fetch (server + client): raw {c['raw'] * 1e3:.1f} ms, checked "
                     f"{c['checked'] * 1e3:.1f} ms, raw-to-file {c['raw_to_file'] * 1e3:.1f} ms; with every CPU busy "
                     f"the ratio is bounded near {c['raw'] / c['checked']:.2f}x")
    if "stages" in r:
        lines.append("checked fetch by stage (medians): " + ", ".join(
            f"{k} {v * 1e3:.1f} ms" for k, v in r["stages"].items()))
    if "sha256" in r:
        lines.append(f"SHA-256 of the 20 MB in memory: {r['sha256'] * 1e3:.1f} ms ({20 / r['sha256']:.0f} MB/s), "
                     f"CPU time {r['sha256_cpu'] * 1e3:.1f} ms ({20 / r['sha256_cpu']:.0f} MB/s)")
    if "checks_alone" in r:
        lines.append(f"the checks alone on the file (no network): {r['checks_alone'] * 1e3:.1f} ms")
    for rate, x in r.get("link", {}).items():
        (q1, q3), (lo, hi) = x["checked_over_raw_quartiles"], x["checked_over_raw_range"]
        lines.append(f"over a loopback shaped to {rate}: raw do_get {x['raw'] * 1e3:.1f} ms "
                     f"({x['raw_mb_s']:.0f} MB/s), checked fetch {x['checked'] * 1e3:.1f} ms "
                     f"({x['checked_mb_s']:.0f} MB/s); checked / raw per round: median "
                     f"{x['checked_over_raw_throughput']:.2f}x, quartiles {q1:.2f}-{q3:.2f}, range {lo:.2f}-{hi:.2f} "
                     f"({x['rounds']} rounds)")
    if "publish_to_usable" in r:
        lines.append(f"publish on A -> usable on B ({r['publish_to_usable_card_bytes'] / 1e3:.0f} KB card): "
                     f"{r['publish_to_usable'] * 1e3:.1f} ms; raw do_get of that card: "
                     f"{r['publish_to_usable_raw_transfer'] * 1e3:.2f} ms")
    if lines:
        _plot(r)
        print("\n" + "\n".join(lines))
        out = Path(os.environ.get("AIOS_FEDERATION_BENCH_SUMMARY", "/tmp/aios-sections/federation_summary.json"))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2))
