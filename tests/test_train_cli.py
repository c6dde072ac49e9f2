"""`aios-fast train` end to end on the bundled MiniLM: defaults (packaged data) pass the gate and
save a card plus a loss-curve PNG; a run that cannot improve is rejected and saves nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aios_fast.cards import LoRAFormat
from aios_fast.cli import main as cli_main

DATA = Path(__file__).parent / "data" / "qa"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_defaults_pass_and_save(tmp_path, capsys):
    out = tmp_path / "cards" / "ferro.lora.arrow"
    assert cli_main(["train", "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    val = res["validation"]
    print(f"\ncli: recall@1 {val['before']:.3f} -> {val['after']:.3f}")
    assert res["passed"] and res["card"] == str(out) and out.is_file()
    assert val["after"] >= val["before"] + 0.05
    png = Path(res["loss_png"])
    assert png == out.with_name("ferro.loss.png") and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = LoRAFormat.load(out)
    assert card.name == "ferro" and json.loads(card.metadata["validation"])["passed"]


def test_train_rejected_card_not_saved(tmp_path, capsys):
    out = tmp_path / "weak.lora.arrow"
    rc = cli_main(["train", "--pairs", str(DATA / "ferrowind_train.jsonl"),
                   "--heldout", str(DATA / "ferrowind_heldout.jsonl"), "--out", str(out),
                   "--epochs", "1", "--lr", "1e-7", "--rank", "2"])
    captured = capsys.readouterr()
    assert rc == 3
    assert "skill rejected, card NOT saved" in captured.err and "below the margin" in captured.err
    assert "recall@1" in captured.out
    assert not out.exists()


def test_train_bad_pairs_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "answer": "a"}\n{"query": "q2"}\n')
    assert cli_main(["train", "--pairs", str(bad), "--out", str(tmp_path / "x.lora.arrow")]) == 1
    assert "bad.jsonl[1]" in capsys.readouterr().err
