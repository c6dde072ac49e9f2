"""QALogger: validation, dedup, filters, compaction/retention, threads, JSONL CLI, and a writer
process killed with SIGKILL while it flushes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pyarrow.dataset as ds
import pytest

from aios_fast.cli import main as cli_main
from aios_fast.errors import InputError
from aios_fast.learn import QALogger
from aios_fast.learn.records import dedup_key, normalise_text


def test_log_dedup_normalised_and_persisted(tmp_path):
    with QALogger(tmp_path, flush_every=10) as log:
        assert log.log("What is a Brindle?", "A  snapshot.", domain="ferro")
        assert not log.log("  what is a   BRINDLE? ", "a snapshot.")  # casefold + whitespace
        assert log.log("What is a brindle?", "A different answer.")
        assert len(log) == 2
    reopened = QALogger(tmp_path)
    assert len(reopened) == 2
    assert not reopened.log("WHAT IS A BRINDLE?", "a snapshot.")  # index rebuilt on open
    assert normalise_text("  A\tB\n c ") == "a b c"
    assert dedup_key("ab", "c") != dedup_key("a", "bc")


@pytest.mark.parametrize("bad, match", [
    (dict(query="", answer="a"), "query: must not be empty"),
    (dict(query=3, answer="a"), "query: expected a string"),
    (dict(query="q", answer="a", router_confidence=1.5), r"router_confidence: expected a number in \[0, 1\]"),
    (dict(query="q", answer="a", router_confidence=float("nan")), "router_confidence"),
    (dict(query="q", answer="a", router_confidence=True), "router_confidence"),
    (dict(query="q" * 9000, answer="a"), "query: 9000 characters, the limit is 8192"),
    (dict(query="q", answer="a", timestamp="yesterday"), "timestamp: expected"),
    (dict(query="q", answer="a", domain=""), "domain: must not be empty"),
], ids=["empty-query", "int-query", "conf-high", "conf-nan", "conf-bool", "too-long", "bad-time", "empty-domain"])
def test_validation_errors(tmp_path, bad, match):
    log = QALogger(tmp_path)
    with pytest.raises(InputError, match=match):
        log.log(**bad)
    assert len(log) == 0


def test_collect_filters_and_dataset(tmp_path):
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with QALogger(tmp_path, flush_every=3) as log:
        for i in range(10):
            log.log(f"q{i}", f"a{i}", domain="a" if i % 2 else "b", timestamp=t0 + timedelta(days=i),
                    router_confidence=i / 10, skill_used=None if i < 5 else "card-x")
    log = QALogger(tmp_path)
    assert len(log.fragments()) == 4  # 3 + 3 + 3 + 1 (close flushes)
    t = log.collect(since=t0 + timedelta(days=2), until="2026-01-08T00:00:01Z", domain="a")
    assert t.column("query").to_pylist() == ["q3", "q5", "q7"]
    assert log.collect(domain=["a", "b"]).num_rows == 10
    assert log.pairs(domain="b")[:2] == [("q0", "a0"), ("q2", "a2")]
    # the directory is one pyarrow dataset for any reader
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == 10


def test_compact_retention_and_size(tmp_path):
    now = datetime(2026, 6, 1, tzinfo=timezone.utc)
    with QALogger(tmp_path, flush_every=1, retention_days=30) as log:
        for i in range(20):
            log.log(f"question {i}", f"answer {i}", timestamp=now - timedelta(days=i * 3))
    log = QALogger(tmp_path, retention_days=30)
    assert len(log.fragments()) == 20
    log.compact(now=now)
    assert len(log.fragments()) == 1
    kept = log.collect().column("query").to_pylist()
    assert set(kept) == {f"question {i}" for i in range(11)}  # 0..30 days old
    assert log.log("question 19", "answer 19")  # dropped by retention, so no longer a duplicate
    size_log = QALogger(tmp_path, max_bytes=1)  # absurdly small: keeps the newest rows only
    size_log.rotate()
    assert size_log.collect().num_rows <= 1


def test_threads_concurrent_writers(tmp_path):
    log = QALogger(tmp_path, flush_every=7)
    def writer(t):
        for i in range(200):
            log.log(f"thread {t} q {i}", f"a {i}")
            log.log(f"shared q {i}", f"shared a {i}")  # all threads race on the same pairs
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    t = QALogger(tmp_path).collect()
    assert t.num_rows == 4 * 200 + 200
    assert len(set(t.column("key").to_pylist())) == t.num_rows


def test_cross_process_duplicates_dropped_by_collect(tmp_path):
    a, b = QALogger(tmp_path), QALogger(tmp_path)  # two writers that do not see each other
    a.log("same", "pair"); b.log("same", "pair")
    a.close(); b.close()
    assert QALogger(tmp_path).collect().num_rows == 1


_WRITER = r"""
import os, sys
from aios_fast.learn import QALogger
log = QALogger(sys.argv[1], flush_every=10**9)
i = 0
while True:
    for _ in range(25):
        # incompressible answers make each flush take a while, so kills land mid-write
        log.log(f"question {i}", f"answer {i} " + os.urandom(8000).hex(), domain="kill")
        i += 1
    log.flush()
    print(i, flush=True)  # everything below i is durable now
"""


@pytest.mark.parametrize("when", ["temp-file-seen", "after-0ms", "after-13ms", "after-31ms"])
def test_sigkill_during_flush_loses_only_unflushed(tmp_path, when):
    flushed = 0
    hit_temp = False
    with subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)],
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            for line in proc.stdout:
                flushed = int(line)
                if flushed >= 100:
                    break
            if when == "temp-file-seen":  # kill the moment a flush has its temp file open
                deadline = time.monotonic() + 20
                while not hit_temp and time.monotonic() < deadline:
                    hit_temp = any(tmp_path.glob(".tmp-*"))
            else:
                time.sleep(int(when.split("-")[1][:-2]) / 1000)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    if when == "temp-file-seen":
        assert hit_temp, "never saw a flush in progress"
    log = QALogger(tmp_path)  # cleans the dead writer's temp files
    assert not list(tmp_path.glob(".tmp-*"))
    t = log.collect()
    got = set(t.column("query").to_pylist())
    assert {f"question {i}" for i in range(flushed)} <= got  # nothing flushed was lost
    assert t.num_rows % 25 == 0  # fragments are all-or-nothing
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == t.num_rows


def test_cli_import_export_roundtrip(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [{"query": f"q{i}", "answer": f"a{i}", "domain": "x" if i < 3 else "y",
             "router_confidence": 0.5, "timestamp": "2026-01-0%dT00:00:00+00:00" % (i + 1)} for i in range(5)]
    rows.append(dict(rows[0], query="Q0 "))  # a duplicate after normalisation
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    log_dir = tmp_path / "log"
    assert cli_main(["qa", "import", str(src), "--log", str(log_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["added"], out["duplicates"]) == (5, 1)
    assert cli_main(["qa", "stats", "--log", str(log_dir), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 5 and stats["domains"] == {"x": 3, "y": 2} and stats["fragments"] == 1
    dst = tmp_path / "out.jsonl"
    assert cli_main(["qa", "export", "--log", str(log_dir), str(dst), "--domain", "x"]) == 0
    back = [json.loads(l) for l in dst.read_text().splitlines()]
    assert [r["query"] for r in back] == ["q0", "q1", "q2"]
    assert back[0]["router_confidence"] == 0.5 and back[0]["timestamp"].startswith("2026-01-01")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "answer": "a"}\n{"query": "q2", "answer": "a", "router_confidence": 7}\n')
    assert cli_main(["qa", "import", str(bad), "--log", str(log_dir)]) == 1
    assert "bad.jsonl:2: router_confidence" in capsys.readouterr().err
    assert len(QALogger(log_dir)) == 5  # nothing from the bad file was appended


def test_temp_files_dead_removed_live_ignored(tmp_path):
    with QALogger(tmp_path) as log:
        log.log("q", "a")
    dead = tmp_path / ".tmp-999999999-deadbeef.parquet"   # no such pid
    live = tmp_path / f".tmp-{os.getppid()}-cafe.parquet"  # a live process's flush in progress
    for p in (dead, live):
        p.write_bytes(b"PAR1 half written")
    log = QALogger(tmp_path)
    assert not dead.exists() and live.exists()
    assert log.collect().num_rows == 1
    assert ds.dataset(str(tmp_path), format="parquet").count_rows() == 1
