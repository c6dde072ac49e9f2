"""`aios-fast bench`: a quick probe run writes a report that follows its JSON Schema, with every
figure measured beside its peer and checked; `bench compare` pairs two reports' figures;
`bench render` puts a report's tables into a Markdown file between markers; the GPU group says
"not run" without a GPU; the extraction case's driver and correctness check work on a real
(small) pair; the route, svd and train_quality cases' checks catch wrong results.

Timings here are not asserted (speed figures live in benchmarks/ and in the reports); the
tests assert the report's structure, the correctness checks and the arithmetic of the ratios.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import jsonschema
import pytest
import torch

from aios_fast.bench import Figure, Goal, Measurement, measure, paired_rounds, schema
from aios_fast.bench import report as bench_report
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


INTRO = """# Benchmarks

Hand-written introduction.

```bash
## a comment in a code fence, not a section
```

## Probe

hand-written section
"""


@pytest.mark.slow
def test_render_into_markdown_between_markers(probe_report, tmp_path, capsys):
    out, report = probe_report
    md = tmp_path / "BENCH.md"
    md.write_text(INTRO)
    rep = out / "report.json"
    assert main(["bench", "render", str(rep), "--into", str(md)]) == 0
    first = md.read_text()
    # the block goes after the title and introduction, before the first section; the rest is kept
    head, rest = first.split("<!-- bench-report:begin -->\n")
    assert head == INTRO[:INTRO.index("## Probe")]
    block, tail = rest.split("<!-- bench-report:end -->\n")
    assert tail == "\n## Probe\n\nhand-written section\n"
    # headed by the command, the report, the machine, the tier and the versions that produced it
    m = report["machine"]
    assert f"Produced by `{report['command']}`" in block and f"(`{rep}`)" in block
    assert f"{m['cpu']}, {m['cores']} logical cores" in block and f"load average at start {m['load_average']}" in block
    assert f"- tier: {report['tier']['name']}" in block and f"torch {torch.__version__}" in block
    assert "### probe" in block and "| figure | ours (median) | peer (median) | ratio |" in block
    for f in report["figures"]:  # every figure, with its ratio and status
        row = next(line for line in block.splitlines() if line.startswith(f"| {f['title']} |"))
        assert f"**{bench_report.format_value(f)}**" in row and f"| {f['status']}" in row
    # the chart link points at the PNG beside the report, from the document's folder
    link = re.search(r"!\[probe\]\(([^)]+)\)", block).group(1)
    assert (md.parent / link).resolve() == (out / "probe.png").resolve()
    # idempotent: the same report again leaves the file byte-identical
    assert main(["bench", "render", str(rep), "--into", str(md)]) == 0
    assert md.read_text() == first
    # another report replaces the block in place
    other = copy.deepcopy(report)
    other["command"] = "aios-fast bench --quick --only probe --out elsewhere"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["bench", "render", str(tmp_path / "other.json"), "--into", str(md)]) == 0
    text = md.read_text()
    assert text.count("<!-- bench-report:begin -->") == text.count("<!-- bench-report:end -->") == 1
    assert "--out elsewhere`" in text and f"Produced by `{report['command']}`" not in text
    assert text.startswith(head) and text.endswith(tail)
    # a named block sits beside the unnamed one; without --into the Markdown is printed
    assert main(["bench", "render", str(rep), "--into", str(md), "--name", "hub"]) == 0
    assert md.read_text().count("<!-- bench-report:begin hub -->") == 1
    # blocks follow each other in the order added, never nested (a block's body has ## headings)
    assert main(["bench", "render", str(rep), "--into", str(md), "--name", "svd"]) == 0
    text = md.read_text()
    pos = [text.index(m) for m in ("<!-- bench-report:begin -->", "<!-- bench-report:end -->",
                                   "<!-- bench-report:begin hub -->", "<!-- bench-report:end hub -->",
                                   "<!-- bench-report:begin svd -->", "<!-- bench-report:end svd -->")]
    assert pos == sorted(pos) and text.endswith(tail)
    capsys.readouterr()
    assert main(["bench", "render", str(rep)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# aios-fast bench") and "| token_norms statistics of 37 Linear outputs, float32" in printed


def test_render_refuses_bad_reports_and_broken_markers(tmp_path, capsys):
    md = tmp_path / "BENCH.md"
    md.write_text(INTRO)
    (tmp_path / "text.json").write_text("{not json")
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "aios-fast-bench/1", "created": "x"}))
    for name, pattern in (("text.json", "text.json: not a JSON report"),
                          ("bad.json", "bad.json: field (top level): 'command' is a required property"),
                          ("missing.json", "missing.json: no such report")):
        assert main(["bench", "render", str(tmp_path / name), "--into", str(md)]) == 1
        assert pattern in capsys.readouterr().err
    assert md.read_text() == INTRO  # nothing written
    # a file with a begin marker and no end marker is not guessed at
    report = _minimal_report()
    (tmp_path / "ok.json").write_text(json.dumps(report))
    md.write_text(INTRO + "<!-- bench-report:begin -->\nhalf a block\n")
    assert main(["bench", "render", str(tmp_path / "ok.json"), "--into", str(md)]) == 1
    err = capsys.readouterr().err
    assert f"{md}: expected one '<!-- bench-report:begin -->' followed by one '<!-- bench-report:end -->'" in err
    assert main(["bench", "render", str(tmp_path / "ok.json"), "--name", "no spaces"]) == 1
    assert "--name 'no spaces'" in capsys.readouterr().err


def _minimal_report() -> dict:
    """A schema-valid report of one measured figure (for the tests that need no real run)."""
    fig = Figure("g.x", "g", "t", ours=Measurement("o", [1.0, 1.0]), peer=Measurement("p", [2.0, 2.0]),
                 goal=Goal(">=", 1.5, "≥ 1.5×"), check="c").finish()
    machine = {"cpu": "cpu", "cores": 2, "ram_gb": 8.0, "gpus": [], "load_average": [1.0, 1.0, 1.0]}
    report = {"schema": "aios-fast-bench/1", "created": "2026-01-01T00:00:00+00:00", "command": "aios-fast bench",
              "quick": True, "seconds": 1.0, "machine": machine,
              "tier": {"name": "leaf", "detected": "leaf", "reason": "r", "forced": False},
              "versions": {"python": "3", "aios-fast": "0", "torch": torch.__version__},
              "settings": {"only": None, "sizes": {}},
              "groups": [{"name": "g", "status": "run", "reason": "", "seconds": 1.0, "figures": ["g.x"]}],
              "figures": [fig.to_dict()], "summary": {"pass": 1}}
    jsonschema.validate(report, schema(), cls=jsonschema.Draft202012Validator)
    return report


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
    assert ("--only nonsense: unknown group(s); groups: probe, cards, svd, route, train_quality, extract, gpu"
            in err)


def test_cli_lists_the_runner_groups():
    from aios_fast.bench.runner import GROUPS
    from aios_fast.cli import bench as cli_bench

    assert cli_bench._GROUPS == tuple(GROUPS)


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
    arrays = cards.read_safetensors(st, "np")  # the NumPy-out peer is checked the same way
    cards.check_loaded(card, None, arrays)
    arrays["layer.a.lora_B.weight"] = arrays["layer.a.lora_B.weight"] * 2
    with pytest.raises(CaseFailed, match="safetensors returned tensors that differ"):
        cards.check_loaded(card, None, arrays)
    assert len(cards.card_shapes("smollm2")) == 211  # every Linear of SmolLM2-135M, lm_head included

    T, B = svd.make_pair((96, 64), torch.float32)
    ref = svd.reference_sigma(T, B, 8)
    s_ours, s_peer = svd.ours(T, B, 8), svd.lowrank(T, B, 8)
    svd.check_sigma(s_ours, s_peer, ref, 8)
    assert svd.sigma_error(svd.full_svd(T, B, 8), ref, 8) < 1e-4
    with pytest.raises(CaseFailed, match="σ_8 relative error"):
        svd.check_sigma(s_ours * 1.05, None, ref, 8)


def test_svd_single_matrix_and_seeded_error_checks():
    from aios_fast.bench.cases import svd

    # the single matrix is the pair's delta in the case's dtype; the reference is LAPACK's, all of it
    T, B = svd.make_pair((160, 96), torch.bfloat16)
    M = svd.make_single((160, 96), torch.bfloat16)
    assert M.dtype == torch.bfloat16 and torch.equal(M, (T.float() - B.float()).to(torch.bfloat16))
    ref = svd.reference_sigma(M, None, 8)
    assert len(ref) == 96 and svd.lapack_fits((160, 96))
    torch.testing.assert_close(ref, torch.linalg.svdvals(M.double()))
    mine = svd.seeded_errors(svd.ours_single, M, None, ref, 8, seeds=range(3))
    peer = svd.seeded_errors(svd.lowrank_single, M, None, ref, 8, seeds=range(3))
    assert len(mine) == len(peer) == 3 and max(mine) < svd.LIMIT
    # seeded: the same errors whatever ran before
    assert svd.seeded_errors(svd.ours_single, M, None, ref, 8, seeds=range(3)) == mine
    svd.check_errors(mine, peer, 8)
    with pytest.raises(CaseFailed, match="median 3.00e-03 / max 4.00e-03 above svd_lowrank's 1.00e-03 / 4.00e-03"):
        svd.check_errors([0.002, 0.003, 0.004], [0.001, 0.001, 0.004], 8)
    with pytest.raises(CaseFailed, match="up to 2.50e-02 over 2 starts"):
        svd.check_errors([0.001, 0.025], None, 8)


def _ctx(tmp_path, **sizes):
    from aios_fast.bench.core import BenchContext
    from aios_fast.bench.sizes import sizes_for

    base = sizes_for("leaf", quick=True)
    return BenchContext(sizes=dataclasses.replace(base, **sizes), workdir=tmp_path)


def test_route_case_runs_and_its_checks_catch_a_wrong_skill(tmp_path):
    from aios_fast.bench.cases import route

    index = route.make_index(100)
    names = route.python_loop(index.per_skill, index.q)
    assert names[0] == index.target == route.numpy_brute(index.E, index.starts, index.names, index.q)[0]
    r = route.route(index)
    route.check_route(r, index.target)
    with pytest.raises(CaseFailed, match="router ranked 'skill50' first, expected the planted 'skill7'"):
        route.check_route(r, "skill7")
    with pytest.raises(CaseFailed, match="NumPy ranked \\['skill50'\\] first"):
        route.check_top(names, "skill7", "NumPy")
    figs = {f.id: f for f in route.run(_ctx(tmp_path, route_skills=(10,), rounds=2))}
    assert set(figs) == {"route.numpy_10skills", "route.loop_10skills"}
    for f in figs.values():
        assert f.status in ("pass", "fail", "info"), (f.id, f.status, f.reason)
        assert len(f.ours.rounds) == len(f.peer.rounds) == 5  # at least 5 paired rounds
        # rounds are seconds per call (many calls per round): the ratio is the same either way
        assert f.config["calls_per_round_ours"] >= 1 and max(f.ours.rounds) < 0.01
        # the status follows the per-call ratio (the sides make different numbers of calls a round)
        assert f.value == pytest.approx(sorted(p / o for o, p in zip(f.ours.rounds, f.peer.rounds))[2])
        if f.goal:
            assert f.status == ("pass" if f.goal.met(f.value) else "fail")
    assert figs["route.numpy_10skills"].goal.target == 0.5 and figs["route.loop_10skills"].goal is None


def test_train_quality_figures_and_checks(tmp_path):
    from aios_fast.bench.cases import train_quality as tq

    # quick: the minutes-long table is "not run", with the reason
    quick = tq.run(_ctx(tmp_path))
    assert [f.id for f in quick] == ["train_quality.quillmere", "train_quality.tidewell", "train_quality.ferrowind"]
    assert all(f.status == "not run" and "not run with --quick" in f.reason for f in quick)

    def rows(ours_recall):
        out = [{"set": "s", "method": "base", "seed": None, "recall@1": 0.5, "mrr@10": 0.6, "seconds": 0.0}]
        for seed, (t_o, t_p, t_f) in enumerate(((10.0, 12.0, 20.0), (11.0, 11.0, 21.0))):
            out += [{"set": "s", "method": "ours", "seed": seed, "recall@1": ours_recall, "mrr@10": 0.8,
                     "drift": 0.1, "seconds": t_o},
                    {"set": "s", "method": "st+peft", "seed": seed, "recall@1": 0.7, "mrr@10": 0.75,
                     "drift": 0.1, "seconds": t_p},
                    {"set": "s", "method": "full", "seed": seed, "recall@1": 0.75, "mrr@10": 0.8,
                     "drift": 0.02, "seconds": t_f}]
        return out

    (f,) = tq.figures(rows(0.75))
    assert f.id == "train_quality.s" and f.per_round() == [1.2, 1.0] and f.value == pytest.approx(1.1)
    assert f.status == "pass" and f.extra["quality"]["ours"]["share_of_full_gain"] == 1.0
    (low,) = tq.figures(rows(0.69))  # faster and learns, but below ST + PEFT: the goal is missed
    assert low.status == "fail" and low.value == pytest.approx(1.1)
    assert low.reason == ("ours' recall@1 0.690 is below ST + PEFT's 0.700; "
                          "ours reaches 76 % of the full fine-tune's recall@1 gain (goal ≥ 90 %)")
    assert tq.quality_shortfalls(tq.summarize(rows(0.72)), "s") == [
        "ours reaches 88 % of the full fine-tune's recall@1 gain (goal ≥ 90 %)"]
    (none,) = tq.figures(rows(0.5))  # learned nothing: the figure is void
    assert none.status == "incorrect" and none.reason == "s: ours' recall@1 0.500 is not above the base model's 0.500"
