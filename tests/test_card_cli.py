"""`aios-fast card inspect|convert`, invoked through aios_fast.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aios_fast.cards import LoRAFormat
from aios_fast.cli import main

DATA = Path(__file__).parent / "data" / "cards"


def test_inspect_json_golden_v2(capsys):
    assert main(["card", "inspect", str(DATA / "golden_v2.lora.arrow"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["name"] == "golden-v2" and info["version"] == 2 and info["checksum"] == "ok"
    assert info["num_modules"] == 3 and info["ranks"] == [2, 3]
    assert info["dtypes"] == ["bfloat16", "float16", "float32"]
    assert info["file_bytes"] == (DATA / "golden_v2.lora.arrow").stat().st_size
    assert info["base_fingerprint"] == "fp1:00112233445566778899aabbccddeeff"
    mods = {m["module"]: m for m in info["modules"]}
    assert mods["encoder.layer.1.output.dense"]["alpha"] == 2.5


def test_inspect_human_v1(capsys):
    assert main(["card", "inspect", str(DATA / "golden_v1.lora.arrow"), "--modules"]) == 0
    out = capsys.readouterr().out
    for text in ("golden-v1", "format: v1", "naming: arrowengine", "modules: 2", "float32",
                 "checksum: absent", "encoder_layers.0.attention.query", "description: golden v1 card"):
        assert text in out


def test_inspect_reports_mismatch_with_exit_1(capsys):
    assert main(["card", "inspect", str(DATA / "hostile" / "flipped_tensor_byte.lora.arrow")]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_inspect_hostile_is_an_error_not_a_traceback(capsys):
    bad = DATA / "hostile" / "huge_declared_shape.lora.arrow"
    assert main(["card", "inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "aios-fast card: error:" in err and bad.name in err


@pytest.mark.parametrize("to", ["v1", "v2"])
def test_convert_between_versions(tmp_path, capsys, to):
    dst = tmp_path / f"out.{to}.lora.arrow"
    assert main(["card", "convert", str(DATA / "golden_v1.lora.arrow"), str(dst), "--to", to, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["src_format"] == "card" and res["modules"] == 2
    assert LoRAFormat.inspect(dst)["version"] == int(to[1])
    assert LoRAFormat.load(dst).equal(LoRAFormat.load(DATA / "golden_v1.lora.arrow"))


def test_convert_card_to_peft_and_back(tmp_path, capsys):
    src = DATA / "golden_v2.lora.arrow"
    assert main(["card", "convert", str(src), str(tmp_path / "peft"), "--to", "peft",
                 "--base-model", "demo"]) == 0
    assert "wrote" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "demo"
    assert main(["card", "convert", str(tmp_path / "peft"), str(tmp_path / "back.lora.arrow")]) == 0
    assert (tmp_path / "back.lora.arrow").read_bytes() == LoRAFormat.save(
        LoRAFormat.load(src), tmp_path / "ref.lora.arrow").read_bytes()
