"""`aios-fast evolve` end to end in a subprocess, with --json, on the test-only Marrowby domain
(tests/data/distill; the defaults were tuned on the bundled Kestrel demo, see evolve/demo):
unsure queries fire the trigger, the node's worker distils a skill with the bundled LocalTeacher,
the gate passes, the skill is added, probe queries now route to it confidently, and the
human-written evaluation's recall@1 rises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data" / "distill"


def _run(args, tmp_path, timeout=1200):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "2" if (os.cpu_count() or 1) >= 2 else "1"}
    return subprocess.run([sys.executable, "-m", "aios_fast.cli", "evolve", *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_evolve_main_job_end_to_end(tmp_path):
    out = tmp_path / "out"
    probes = tmp_path / "probes.txt"
    probes.write_text("how much are late fees for dvds\nhow many ebooks can I have out in shelfwise\n"
                      "when does the central library close on saturday\nhow do I book the heron room\n")
    # the defaults: 120 teacher questions, a 4-fold cross-fitted gate on held-out teacher questions
    proc = _run(["--docs", str(DATA / "docs"), "--queries", str(DATA / "queries.txt"),
                 "--probe-queries", str(probes), "--eval", str(DATA / "eval.jsonl"),
                 "--out", str(out), "--json"], tmp_path)
    assert proc.returncode in (0, 3), proc.stderr[-4000:]
    rep = json.loads(proc.stdout)
    assert (proc.returncode == 0) == rep["passed"]
    assert rep["stream"]["fired"] >= 1
    jobs = rep["learning"]["jobs"]
    assert rep["learning"]["finished"] and jobs
    job = jobs[0]
    g = job["gate"] or {}
    print(f"\nevolve: exit {proc.returncode} in {rep['seconds']} s; jobs {len(jobs)}; split {job['split']}; gate "
          f"{g.get('metric')} {g.get('before')} -> {g.get('after')}, bootstrap LB loss "
          f"{(g.get('details') or {}).get('loss_reduction_lower_bound')}, mrr "
          f"{(g.get('details') or {}).get('mrr@10_gain_lower_bound')}; human eval recall@1 "
          f"{rep['before'].get('recall@1')} -> {rep['after'].get('recall@1')}, MRR@10 "
          f"{rep['before'].get('mrr@10')} -> {rep['after'].get('mrr@10')}; reason: {job['reason']}")
    assert job["pairs"]["teacher"]["asked"] > 0 and job["gate"] is not None and job["qa_logged"] > 0
    assert rep["before"]["n"] == 48 and not rep["before"]["missing"]
    for png in rep["figures"].values():
        assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["passed"] == rep["passed"]
    assert rep["passed"], f"the loop ran but no skill was kept: {job['reason']}"
    assert any(j["ok"] and j["tier"] == 2 for j in jobs)
    gate = rep["skill"]["validation"]
    assert gate["passed"] and gate["after"] >= gate["before"] + gate["margin"]
    assert gate["details"]["gate_heldout"] == "questions" and gate["details"]["cross_fit_folds"] == 4
    assert gate["details"]["gate_statistic"] == "loss" and gate["details"]["loss_reduction_lower_bound"] > 0.0
    assert rep["after"]["probe_confidence"] > rep["before"]["probe_confidence"] + 0.3
    assert rep["after"]["probe_routed"] >= 3
    assert rep["after"]["recall@1"] > rep["before"]["recall@1"]
    assert rep["skill"]["sources"] and all(len(s["hash"]) == 64 for s in rep["skill"]["sources"])
    assert (out / "library" / "index.parquet").exists() or list((out / "library").rglob("*.lora.arrow"))


def test_evolve_bad_gate_folds_is_refused_by_name(tmp_path):
    from aios_fast.cli import evolve as cli_evolve
    from aios_fast.evolve import distiller

    assert sorted(cli_evolve.GATE_HELDOUT) == sorted(distiller.GATE_HELDOUT)
    proc = _run(["--gate-folds", "-2", "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert proc.returncode == 1 and "--gate-folds" in proc.stderr and "got -2" in proc.stderr, proc.stderr[-2000:]
    proc = _run(["--teacher-questions", "0", "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert proc.returncode == 1 and "--teacher-questions" in proc.stderr and "got 0" in proc.stderr, proc.stderr[-2000:]
    proc = _run(["--gate-heldout", "both", "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert proc.returncode == 2 and "--gate-heldout" in proc.stderr and "'both'" in proc.stderr, proc.stderr[-2000:]


def test_evolve_bad_input_names_the_file(tmp_path):
    proc = _run(["--queries", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "missing.txt" in proc.stderr and "no such queries file" in proc.stderr
    proc = _run(["--teacher-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "o")], tmp_path, timeout=120)
    assert proc.returncode == 1 and "--teacher-model" in proc.stderr
