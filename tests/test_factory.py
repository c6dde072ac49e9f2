"""SkillFactory.nightly_distill on a real QA log with the bundled MiniLM: three unlabelled
domains -> one gated skill per domain; a second night with 10 % new records keeps the domain
ids and retrains only the domain that grew. Also the journal, the run lock and the cron
schedule's misfire rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from _factory_data import DATA, fill_log, mixed_records, records
from aios_fast.errors import InputError
from aios_fast.factory.domains import DomainClusterer, ctfidf_terms, match_centroids
from aios_fast.factory.journal import Journal, JournalError, LockHeldError, RunLock
from aios_fast.factory.schedule import CronSchedule, run_schedule

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(min_records=10, rank=8, epochs=3, lr=3e-3, batch_size=16)


@pytest.fixture(scope="module")
def night1(encoder, tmp_path_factory):
    from aios_fast.factory import SkillFactory
    from aios_fast.learn import QALogger

    ws = tmp_path_factory.mktemp("factory")
    log = QALogger(ws / "qa")
    truth = fill_log(log, mixed_records())
    published = []
    fac = SkillFactory(encoder, ws, logger=log, executor="inline", publish=published.append, **CONFIG)
    report = fac.nightly_distill()
    return fac, report, truth, published


@pytest.mark.slow
def test_first_night_one_gated_skill_per_domain(night1):
    fac, report, truth, published = night1
    trained = [d for d in report.domains if d.skill]
    assert len(trained) == 3, report.to_dict()
    assert all(d.passed and d.published for d in trained), [(d.name, d.reason) for d in trained]
    assert all(d.after >= d.before + 0.05 for d in trained)          # the gate's margin, held-out
    assert report.outliers < 0.25 * report.records                     # outliers left out, not many
    # each domain is one true domain: the queries it trained on come from a single source
    state = fac.state()
    assert {d.skill for d in trained} == {f"{d.name}_v1" for d in trained}
    # the library holds exactly one passed version per domain, and publish saw each once
    entries = fac.library.list(all_versions=True)
    assert sorted(e.name for e in entries) == sorted(d.name for d in trained)
    assert all(e.version == 1 and e.passed and e.origin == "trained" for e in entries)
    assert sorted(e.key for e in published) == sorted(e.key for e in entries)
    for e in entries:
        doms = Counter(truth[q] for q in e.examples)
        assert len(doms) == 1, (e.name, doms)                              # pure clusters
        assert e.metadata["factory_version"] == f"{e.name}_v1"
        card = fac.library.load_card(e)
        assert card.metadata["factory_domain_id"] in {str(d["id"]) for d in state["domains"]}
    # every record of a trained domain is consumed; outliers stay for a later night
    j = fac.journal
    assert [e["event"] for e in j.events][-1] == "committed"
    assert j.last(event="committed")["consumed"] == sum(d.new for d in trained)


@pytest.mark.slow
def test_second_night_keeps_ids_and_retrains_only_grown_domain(night1):
    fac, report1, truth, published = night1
    ids1 = {d.name: d.domain_id for d in report1.domains}
    new = records(DATA / "kitchen_night2.jsonl")                       # 15 new: 10 % of the log
    fill_log(fac.logger, [("kitchen", r) for r in new], t0=2.0e9)
    report2 = fac.nightly_distill()
    assert report2.new_records >= len(new) and not report2.resumed
    ids2 = {d.name: d.domain_id for d in report2.domains}
    assert all(ids2.get(n) == i for n, i in ids1.items()), (ids1, ids2)   # same ids, same names
    retrained = [d for d in report2.domains if d.skill]
    assert len(retrained) == 1
    kitchen = retrained[0]
    kitchen_v1 = next(e for e in published if Counter(truth[q] for q in e.examples).most_common(1)[0][0] == "kitchen")
    assert kitchen.name == kitchen_v1.name and kitchen.skill == f"{kitchen.name}_v2"
    assert CONFIG["min_records"] <= kitchen.new <= len(new)             # a few may be outliers
    others = [d for d in report2.domains if not d.skill]
    assert all("min_records" in d.reason for d in others)
    if kitchen.passed:
        v2 = fac.library.get(kitchen.name)
        assert v2.version == 2
        card = fac.library.load_card(v2)
        assert json.loads(card.metadata["warm_start"])["from"].startswith(kitchen.name)
    # a third night with nothing new trains nothing
    report3 = fac.nightly_distill()
    assert report3.new_records <= report3.outliers + 2 and not any(d.skill for d in report3.domains)


def test_domain_matching_and_names_are_stable():
    rng = np.random.default_rng(0)
    centres = np.linalg.qr(rng.standard_normal((64, 3)))[0].T          # 3 orthonormal directions
    X = np.concatenate([c + 0.05 * rng.standard_normal((40, 64)) for c in centres]).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    texts = ["disk snapshot volume"] * 40 + ["salary payslip tax"] * 40 + ["chef steak kitchen"] * 40
    labels = ["general"] * 80 + ["cooking"] * 40
    cl = DomainClusterer(min_cluster_size=10)
    first = cl.assign(X, texts, labels)
    assert first.n_clusters == 3 and first.n_outliers == 0
    names = {d.id: d.name for d in first.domains}
    assert "cooking" in names.values()                                     # the records' own label wins
    assert {"disk_snapshot", "payslip_salary"} <= set(names.values()) or len(set(names.values())) == 3
    # shuffle the rows: the same clusters come back with the same ids and names
    perm = rng.permutation(len(X))
    second = cl.assign(X[perm], [texts[i] for i in perm], [labels[i] for i in perm], first.domains)
    assert second.new_ids == [] and {d.id: d.name for d in second.domains} == names
    assert all(first.domain_of[perm][i] == second.domain_of[i] for i in range(len(X)))
    assert all(cos > 0.99 for _, cos in second.matched.values())
    # a centroid below the threshold is not matched
    assert match_centroids(centres[:1], -centres[:1], 0.5) == []
    with pytest.raises(InputError, match="384-d|-d centroids"):
        cl.assign(np.ones((5, 8), np.float32), ["a"] * 5, None, first.domains)
    assert ctfidf_terms([["the disk disk volume"], ["tax salary salary"]], 1) == [["disk"], ["salary"]]


def test_journal_survives_torn_tail_and_refuses_damage(tmp_path):
    p = tmp_path / "j.jsonl"
    j = Journal(p)
    j.append("planned", run="r1")
    j.append("trained", run="r1", job="a_v1")
    with open(p, "ab") as f:                                              # a kill inside write()
        f.write(b'{"crc": "0000", "e": {"event": "publ')
    j2 = Journal(p)
    assert [e["event"] for e in j2.events] == ["planned", "trained"]
    j2.append("published", run="r1", job="a_v1")
    assert [e["event"] for e in Journal(p).events] == ["planned", "trained", "published"]
    lines = p.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b"planned", b"plannex")                  # damage in the middle
    p.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalError, match=r"j\.jsonl:1: damaged"):
        Journal(p)


def test_run_lock_excludes_and_survives_a_killed_holder(tmp_path):
    lock_path = tmp_path / "lock"
    code = ("import sys, time; sys.path.insert(0, %r);"
            "from aios_fast.factory.journal import RunLock;"
            "l = RunLock(%r).acquire(); print('locked', flush=True); time.sleep(60)") % (
        os.environ.get("PYTHONPATH", ""), str(lock_path))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeldError, match=f"pid {child.pid}"):
            RunLock(lock_path).acquire()
        child.kill()                                                     # SIGKILL: no release
        child.wait()
        with RunLock(lock_path) as lock:
            assert lock.stale["pid"] == child.pid and lock.stale["alive"] is False
            assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        assert "released" in json.loads(lock_path.read_text())
        with RunLock(lock_path) as again:                                # a clean release is not stale
            assert again.stale is None
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_cron_schedule_misfire_grace(tmp_path):
    day = 1_800_000_000 - 1_800_000_000 % 86400                           # a midnight, UTC
    sched = CronSchedule("0 2 * * *", misfire_grace=3600)
    assert sched.decide(None, day + 2 * 3600 + 1800) == ("run", day + 7200)   # 30 min late: run
    assert sched.decide(day + 7200, day + 3 * 3600) [0] == "wait"            # already done
    assert sched.decide(day + 7200 - 86400, day + 5 * 3600) == ("missed", day + 7200)  # 3 h late
    assert sched.decide(None, day + 5 * 3600)[0] == "wait"
    with pytest.raises(InputError, match="cron"):
        CronSchedule("every night")
    # the loop: a clock that starts at 01:59, sleeps are clock jumps; two nights, then stop
    clock = {"t": day + 2 * 3600 - 60}
    ran = []

    def sleep(s):
        clock["t"] += max(s, 1.0)

    n = run_schedule(lambda: ran.append(clock["t"]) or "ok", sched, tmp_path / "s.json",
                     now=lambda: clock["t"], sleep=sleep, max_runs=2)
    assert n == 2 and [int(t - day) // 3600 for t in ran] == [2, 26]
    assert json.loads((tmp_path / "s.json").read_text())["last_fire"] == day + 86400 + 7200


def test_factory_cli_run_once_prints_the_domain_table(tmp_path, capsys):
    from aios_fast.cli import main
    from aios_fast.learn import QALogger

    with QALogger(tmp_path / "qa") as log:
        fill_log(log, [("payroll", r) for r in records(DATA / "payroll.jsonl")])
    argv = ["factory", "run", "--once", "--workspace", str(tmp_path / "ws"), "--log", str(tmp_path / "qa"),
            "--min-records", "100"]
    assert main(argv + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["records"] == 45 and rep["new_records"] == 45 and rep["clusters"] >= 1
    assert all(d["skill"] is None and "< min_records 100" in d["reason"] for d in rep["domains"])
    assert main(argv) == 0                                   # nothing consumed: the same records again
    out = capsys.readouterr().out
    assert "45 records, 45 new" in out and "published" not in out
    assert main(["factory", "run", "--once", "--workspace", str(tmp_path / "ws"), "--log",
                 str(tmp_path / "missing"), "--min-records", "2"]) == 1
    assert "min_records" in capsys.readouterr().err
