"""`aios-fast skills list|add|remove|route|calibrate|log` on a real library directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aios_fast import CognitiveTrigger, LoRAFormat, RouteResult
from aios_fast.cli import main
from aios_fast.lora.random import random_card

DATA = json.loads((Path(__file__).parent / "data" / "routing" / "domains.json").read_text())
SHAPES = {"encoder.layer.0.attention.self.query": (384, 384)}


def run(capsys, *argv):
    code = main(["skills", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv):
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def cards(tmp_path):
    out = {}
    for i, name in enumerate(["cooking", "travel", "gardening"]):
        p = tmp_path / f"{name}.lora.arrow"
        LoRAFormat.save(random_card(SHAPES, name=name, rank=2, seed=i,
                                    metadata={"description": DATA["domains"][name]["description"]}), p)
        out[name] = p
    return out


def test_add_list_remove(capsys, tmp_path, cards):
    lib = str(tmp_path / "lib")
    row = run_json(capsys, "add", str(cards["cooking"]), "-L", lib, "-e", "How do I boil an egg?",
                   "-e", "Best pasta sauce?")
    assert row["key"] == "cooking@v1" and row["examples"] == 2 and row["passed"]
    ex = tmp_path / "travel.txt"
    ex.write_text("\n".join(DATA["domains"]["travel"]["register"]) + "\n\n")
    row = run_json(capsys, "add", str(cards["travel"]), "-L", lib, "--examples-file", str(ex),
                   "--origin", "peer")
    assert row["examples"] == 10 and row["passed"] is False        # a peer card without a report
    listed = run_json(capsys, "list", "-L", lib)
    assert [s["key"] for s in listed["skills"]] == ["cooking@v1"] and listed["problems"] == []
    assert [s["key"] for s in run_json(capsys, "list", "-L", lib, "--all")["skills"]] == \
        ["cooking@v1", "travel@v1"]
    code, out, _ = run(capsys, "list", "-L", lib)
    assert code == 0 and "cooking@v1" in out and "passed" in out
    assert run_json(capsys, "remove", "travel", "-L", lib) == {"removed": ["travel@v1"]}
    code, _, err = run(capsys, "remove", "travel", "-L", lib)
    assert code == 1 and "no skill named 'travel'" in err


def test_errors_are_clear(capsys, tmp_path):
    code, _, err = run(capsys, "list", "-L", str(tmp_path / "missing"))
    assert code == 1 and "no such library directory" in err
    bad = tmp_path / "bad.lora.arrow"
    bad.write_bytes(b"not a card")
    code, _, err = run(capsys, "add", str(bad), "-L", str(tmp_path / "lib"))
    assert code == 1 and "bad.lora.arrow" in err
    code, _, err = run(capsys, "add", str(bad), "-L", str(tmp_path / "lib"), "--examples-file",
                       str(tmp_path / "nope.txt"))
    assert code == 1 and "--examples-file" in err


def test_route_calibrate_and_log(capsys, tmp_path, cards):
    lib = str(tmp_path / "lib")
    for name, path in cards.items():
        args = ["add", str(path), "-L", lib]
        for q in DATA["domains"][name]["register"]:
            args += ["-e", q]
        run_json(capsys, *args)
    res = run_json(capsys, "route", "how do I stop slugs eating my lettuce", "what is the capital of Peru",
                   "-L", lib, "--top-k", "2")
    assert res["calibration"] == "default"
    garden, ood = res["routes"]
    assert garden["ranked"][0][0] == "gardening" and len(garden["ranked"]) == 2
    assert ood["skill"] is None and ood["confidence"] < garden["confidence"]
    metrics = run_json(capsys, "calibrate", "-L", lib)
    assert 0 <= metrics["ece"] <= 1 and metrics["auroc"] > 0.8 and metrics["n_in_domain"] == 30
    assert (tmp_path / "lib" / "calibration.json").is_file()
    assert run_json(capsys, "route", "cheap flights to Lisbon", "-L", lib)["calibration"] == "fitted"
    # the trigger of a node on this library writes the decision log the CLI shows
    trig = CognitiveTrigger(min_support=2, state_dir=tmp_path / "lib" / "trigger")
    unsure = RouteResult([("cooking", 0.1)], 0.05, 0.0, None)
    trig.observe("how do hives survive winter", unsure, embedding=[1.0, 0.0, 0.0])
    trig.observe("how do bee colonies overwinter", unsure, embedding=[0.8, 0.6, 0.0])
    log = run_json(capsys, "log", "-L", lib)["decisions"]
    assert [d["reason"] for d in log] == ["collecting", "fired"]
    assert run_json(capsys, "log", "-L", lib, "--fired")["decisions"][0]["query"] == "how do bee colonies overwinter"
    code, out, _ = run(capsys, "log", "-L", lib)
    assert code == 0 and "fired" in out
