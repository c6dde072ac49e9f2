"""A nightly run killed with SIGKILL in the middle of training resumes from its journal:
the job that had finished is not retrained, every version is published exactly once, and no
QA record is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from _factory_data import fill_log, mixed_records

SCRIPT = r"""
import json, os, sys
from pathlib import Path
from aios_fast.engines import SentenceEncoder
from aios_fast.factory import SkillFactory

ws = Path(sys.argv[1])
def publish(entry):
    # one line per publish call, durably: the parent counts them after the kill
    with open(ws / "published.txt", "a") as f:
        f.write(entry.key + "\n"); f.flush(); os.fsync(f.fileno())
fac = SkillFactory(SentenceEncoder(), ws, executor="inline", publish=publish, min_records=10,
                   rank=8, epochs=3, lr=3e-3, batch_size=16)
report = fac.nightly_distill()
print(json.dumps(report.to_dict()))
"""


def _run(ws: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(ws)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _events(ws: Path) -> list[dict]:
    p = ws / "journal.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line)["e"])
        except ValueError:
            break  # a line being written right now
    return out


@pytest.mark.slow
def test_sigkill_mid_training_resumes_and_publishes_each_version_once(tmp_path):
    from aios_fast.learn import QALogger

    with QALogger(tmp_path / "qa") as log:
        fill_log(log, mixed_records())
        n_records = len(log)
    child = _run(tmp_path)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ev = _events(tmp_path)
            if any(e["event"] == "trained" for e in ev):
                break
            assert child.poll() is None, child.stderr.read()
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)                      # mid-training: job 2 is running
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    ev = _events(tmp_path)
    jobs = next(e for e in ev if e["event"] == "planned")["jobs"]
    assert len(jobs) == 3
    trained_before = {e["job"] for e in ev if e["event"] == "trained"}
    assert 1 <= len(trained_before) < 3
    assert not any(e["event"] in ("published", "committed") for e in ev)

    child = _run(tmp_path)                                      # the next start resumes
    out, err = child.communicate(timeout=900)
    assert child.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["resumed"] is True
    ev = _events(tmp_path)
    trained = Counter(e["job"] for e in ev if e["event"] == "trained")
    assert trained == Counter({j: 1 for j in jobs})             # nothing trained twice
    published = Counter(e["job"] for e in ev if e["event"] == "published")
    passed = [d["skill"] for d in report["domains"] if d.get("passed")]
    assert published == Counter({j: 1 for j in passed}) and len(passed) == 3
    calls = (tmp_path / "published.txt").read_text().split()
    assert len(calls) == len(set(calls)) == 3                   # each version published exactly once
    from aios_fast.route.library import SkillLibrary

    lib = SkillLibrary(tmp_path / "library")
    assert sorted(e.key for e in lib.list(all_versions=True)) == sorted(calls)
    # no record lost: the log is intact, and the records of the trained domains are consumed
    with QALogger(tmp_path / "qa") as log:
        assert len(log) == n_records
    committed = [e for e in ev if e["event"] == "committed"]
    assert len(committed) == 1
    assert committed[0]["consumed"] == sum(d["new"] for d in report["domains"] if d.get("skill"))
    assert committed[0]["consumed"] + report["outliers"] == n_records
