"""`aios-fast bench`: a quick probe run writes a report that follows its JSON Schema, with every
figure measured beside its peer and checked; `bench compare` pairs two reports' figures;
`bench markdown` pastes a report into a Markdown file; the GPU group says "not run" without a
GPU; the extraction case's driver and correctness check work on a real (small) pair.

Timings here are not asserted (speed figures live in benchmarks/ and in the reports); the
tests assert the report's structure, the correctness checks and the arithmetic of the ratios.
"""

from __future__ import annotations

import copy
import json
import math

import jsonschema
import pytest
import torch

from aios_fast.bench import Figure, Goal, Measurement, measure, paired_rounds, schema
from aios_fast.bench.core import CaseFailed
from aios_fast.cli import main

PNG = b"\x89PNG\r\n\x1a\n"
PROBE_FIGURES = {"probe.forward_overhead", "probe.seed_hooks_overhead", "probe.kernel_float32",
                 "probe.kernel_bfloat16"}


@pytest.fixture(scope="module")
def probe_report(tmp_path_factory):
    """One real `aios-fast bench --quick --only probe --out DIR` run, shared by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "tmp"
    rc = main(["bench", "--quick", "--only", "probe", "--out", str(out), "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_quick_probe_report_follows_schema(probe_report):
    out, report = probe_report
    jsonschema.Draft202012Validator.check_schema(schema())
    jsonschema.validate(report, schema(), cls=jsonschema.Draft202012Validator)
    assert report["quick"] is True and report["command"].startswith("aios-fast bench --quick --only probe")
    assert report["tier"]["name"] == ("leaf" if not torch.cuda.is_available() else report["tier"]["detected"])
    assert report["machine"]["cores"] >= 1 and len(report["machine"]["load_average"]) == 3
    assert report["versions"]["torch"] == torch.__version__
    assert [g["name"] for g in report["groups"]] == ["probe"]
    figs = {f["id"]: f for f in report["figures"]}
    assert set(figs) == PROBE_FIGURES
    for f in figs.values():
        # measured beside the peer, checked, and the quoted value is the median of per-round ratios
        assert f["status"] in ("pass", "fail", "info"), (f["id"], f["status"], f["reason"])
        assert f["ours"] and f["peer"] and f["check"]
        n = min(len(f["ours"]["rounds"]), len(f["peer"]["rounds"]))
        assert n >= 2
        per = [o / p for o, p in zip(f["ours"]["rounds"][:n], f["peer"]["rounds"][:n])]
        quoted = [100 * (r - 1) for r in per] if f["metric"] == "overhead" else [1 / r for r in per]
        assert f["spread"][0] == pytest.approx(min(quoted), rel=1e-3, abs=1e-3)
        assert f["spread"][1] == pytest.approx(max(quoted), rel=1e-3, abs=1e-3)
        assert f["spread"][0] <= f["value"] <= f["spread"][1] and math.isfinite(f["value"])
        if f["goal"]:
            met = f["value"] >= f["goal"]["target"] if f["goal"]["op"] == ">=" else f["value"] <= f["goal"]["target"]
            assert f["status"] == ("pass" if met else "fail")
    assert figs["probe.forward_overhead"]["metric"] == "overhead"
    assert figs["probe.forward_overhead"]["ours"]["clock"] == "cpu"
    assert figs["probe.kernel_float32"]["config"]["modules"] == 37  # every Linear of MiniLM
    assert sum(report["summary"].values()) == 4
    md = (out / "report.md").read_text()
    assert "aios-fast bench --quick --only probe" in md and "| forward with WeightMapProbe hooks" in md
    assert report["groups"][0]["chart"] == "probe.png"
    assert (out / "probe.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_compare_two_reports(probe_report, tmp_path, capsys):
    out, report = probe_report
    # a second real report: the GPU group (not run on a CPU machine, measured on a GPU one)
    if not torch.cuda.is_available():
        assert main(["bench", "--quick", "--only", "gpu", "--out", str(tmp_path / "gpu"), "--no-progress"]) == 0
        gpu = json.loads((tmp_path / "gpu" / "report.json").read_text())
        assert gpu["groups"] == [{"name": "gpu", "status": "not run", "seconds": 0.0, "figures": [], "chart": None,
                                  "reason": "no CUDA GPU visible to torch on this machine",
                                  "load_average": gpu["groups"][0]["load_average"]}]
        assert gpu["figures"] == [] and gpu["summary"] == {}
        capsys.readouterr()
        assert main(["bench", "compare", str(out / "report.json"), str(tmp_path / "gpu" / "report.json"),
                     "--json"]) == 0
        cmp = json.loads(capsys.readouterr().out)
        assert {r["id"] for r in cmp["rows"]} == PROBE_FIGURES
        assert all(r["b_status"] == "absent" and r["b"] is None and r["change"] is None for r in cmp["rows"])
    # the same figures from "another machine": ratios twice as good, overheads 3 points lower
    other = copy.deepcopy(report)
    for f in other["figures"]:
        if f["metric"] == "speedup":
            f["value"] *= 2
        else:
            f["value"] -= 3
    other["machine"]["cores"] = 16
    (tmp_path / "b.json").write_text(json.dumps(other))
    assert main(["bench", "compare", str(out / "report.json"), str(tmp_path / "b.json"), "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    rows = {r["id"]: r for r in cmp["rows"]}
    assert rows["probe.kernel_float32"]["change"] == pytest.approx(2.0)
    assert rows["probe.forward_overhead"]["change"] == pytest.approx(-3.0)
    assert "16 cores" in cmp["b"]
    # the human-readable table names both sides
    assert main(["bench", "compare", str(out / "report.json"), str(tmp_path / "b.json")]) == 0
    text = capsys.readouterr().out
    assert "probe.kernel_float32" in text and "B vs A" in text and "2.00×" in text


@pytest.mark.slow
def test_markdown_section_is_replaced_in_place(probe_report, tmp_path):
    out, _ = probe_report
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\nhand-written text\n")
    for _ in range(2):  # idempotent: the second run replaces the first section
        assert main(["bench", "markdown", str(out / "report.json"), "--into", str(md)]) == 0
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written text\n")
    assert text.count("<!-- aios-fast bench: begin generated -->") == 1
    assert text.count("<!-- aios-fast bench: end generated -->") == 1
    assert "| token_norms statistics of 37 Linear outputs, float32" in text


def test_compare_rejects_a_broken_report(tmp_path, capsys):
    bad = {"schema": "aios-fast-bench/1", "created": "x"}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    (tmp_path / "other.json").write_text(json.dumps({"schema": "something-else/9"}))
    (tmp_path / "text.json").write_text("not json")
    for name, pattern in (("bad.json", "bad.json: field (top level): 'command' is a required property"),
                          ("other.json", "schema 'something-else/9', expected 'aios-fast-bench/1'"),
                          ("text.json", "text.json: not a JSON report"),
                          ("missing.json", "missing.json: no such report")):
        assert main(["bench", "compare", str(tmp_path / name), str(tmp_path / name)]) == 1
        err = capsys.readouterr().err
        assert pattern in err, err


def test_unknown_group_is_refused(capsys):
    assert main(["bench", "--only", "probe,nonsense", "--out", "unused"]) == 1
    err = capsys.readouterr().err
    assert "--only nonsense: unknown group(s); groups: probe, cards, svd, extract, gpu" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_gpu_group_not_run_without_gpu(tmp_path):
    from aios_fast.bench import run_suite

    report = run_suite(tier="super", only=["gpu"], quick=True, progress=False)
    assert report["tier"] == {"name": "super", "detected": "leaf", "forced": True,
                              "reason": report["tier"]["reason"]}
    assert report["groups"][0]["status"] == "not run" and "no CUDA GPU" in report["groups"][0]["reason"]
    jsonschema.validate(report, schema(), cls=jsonschema.Draft202012Validator)


# ------------------------------------------------------------------ the arithmetic of a figure
def test_figure_ratio_spread_and_goal():
    f = Figure("g.speed", "g", "t", ours=Measurement("o", [1.0, 2.0, 1.0]), peer=Measurement("p", [4.0, 4.0, 3.0]),
               goal=Goal(">=", 3.0, "≥ 3×")).finish()
    assert f.per_round() == [4.0, 2.0, 3.0] and f.value == 3.0 and f.status == "pass"
    d = f.to_dict()
    assert d["spread"] == [2.0, 4.0] and d["unit"] == "x" and d["ours"]["median"] == 1.0
    o = Figure("g.over", "g", "t", ours=Measurement("o", [1.1, 1.3]), peer=Measurement("p", [1.0, 1.0]),
               metric="overhead", goal=Goal("<=", 5.0, "≤ 5 %")).finish()
    assert o.value == pytest.approx(20.0) and o.status == "fail" and o.unit == "%"
    with pytest.raises(ValueError, match="Goal.op must be"):
        Goal("==", 1.0, "x")


def test_paired_rounds_alternate_and_measure_flags_wrong_results():
    calls = []
    t_o, t_p, r_o, r_p = paired_rounds(lambda: calls.append("o") or 1, lambda: calls.append("p") or 2,
                                       rounds=3, warmup=1)
    assert calls == ["o", "p", "o", "p", "p", "o", "o", "p"] and (r_o, r_p) == (1, 2)
    assert len(t_o) == len(t_p) == 3

    def check(o, p):
        if o != p:
            raise CaseFailed(f"ours {o} != peer {p}")

    bad = measure(Figure("g.x", "g", "t"), lambda: 1, lambda: 2, check, rounds=2)
    assert bad.status == "incorrect" and bad.reason == "ours 1 != peer 2" and bad.ours is not None
    err = measure(Figure("g.y", "g", "t"), lambda: 1 / 0, None, None, rounds=1)
    assert err.status == "error" and "ZeroDivisionError" in err.reason


# ------------------------------------------------------------------ the extraction case, small
@pytest.mark.slow
def test_extract_driver_and_check_on_a_small_pair(tmp_path, monkeypatch):
    """Our CLI through the timing driver on the cached 4-layer pair: both times come back, the
    card passes the check against tuned − base, and the check fails on a card of another pair."""
    from aios_fast.bench.cases import extract as ex
    from aios_fast.bench.cases.pairs import SHAPES, ensure_pair, linear_names

    monkeypatch.setenv("AIOS_FAST_CACHE", str(tmp_path / "cache"))
    pair = ensure_pair("tiny")
    assert ensure_pair("tiny") == pair and (pair / "complete.json").exists()  # generated once
    assert len(linear_names("tiny")) == 7 * SHAPES["tiny"].num_hidden_layers
    card = tmp_path / "ours.lora.arrow"
    wall, after = ex.run_tool(ex.ours_command(pair, card, 16))
    assert 0 < after < wall
    ex.check_card(card, pair, "tiny")
    other = ensure_pair("tiny", seed=1)
    with pytest.raises(CaseFailed, match="relative error"):
        ex.check_card(card, other, "tiny")


# ------------------------------------------------------------------ the checks catch wrong results
def test_card_and_svd_checks_pass_right_results_and_catch_wrong_ones(tmp_path):
    from aios_fast.bench.cases import cards, svd
    from aios_fast.cards import LoRAFormat

    card, arrow, st = cards.make_card_files({"layer.a": (12, 8), "layer.b": (8, 12)}, tmp_path, "small")
    loaded, tensors = LoRAFormat.load(arrow), cards.read_safetensors(st)
    cards.check_loaded(card, loaded, tensors)
    tensors["layer.b.lora_A.weight"] = tensors["layer.b.lora_A.weight"].clone()
    tensors["layer.b.lora_A.weight"][0, 0] += 1e-3
    with pytest.raises(CaseFailed, match="safetensors returned tensors that differ"):
        cards.check_loaded(card, None, tensors)

    T, B = svd.make_pair((96, 64), torch.float32)
    ref = svd.reference_sigma(T, B, 8)
    s_ours, s_peer = svd.ours(T, B, 8), svd.lowrank(T, B, 8)
    svd.check_sigma(s_ours, s_peer, ref, 8)
    assert svd.sigma_error(svd.full_svd(T, B, 8), ref, 8) < 1e-4
    with pytest.raises(CaseFailed, match="σ_8 relative error"):
        svd.check_sigma(s_ours * 1.05, None, ref, 8)
