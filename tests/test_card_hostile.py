"""Every malicious or broken file in tests/data/cards/hostile is refused with CardFormatError
naming the file, by load (verified or not, where the defect is structural) and by inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aios_fast import CardFormatError
from aios_fast.cards import LoRAFormat

HOSTILE = Path(__file__).parent / "data" / "cards" / "hostile"
FILES = sorted(HOSTILE.glob("*.lora.arrow"))
# defects only the checksum or the value scan can see; verify=False trusts them by design
CONTENT_ONLY = {"flipped_tensor_byte", "flipped_metadata_byte", "checksum_mismatch",
                "nan_values", "inf_values"}


def _id(p: Path) -> str:
    return p.name.removesuffix(".lora.arrow")


def test_hostile_folder_is_complete():
    listed = json.loads((HOSTILE.parent / "golden.json").read_text())["hostile"]
    assert sorted(p.name for p in FILES) == listed and len(FILES) >= 50


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_hostile_file_refused(path):
    with pytest.raises(CardFormatError) as info:
        LoRAFormat.load(path)
    assert path.name in str(info.value)


@pytest.mark.parametrize("path", [p for p in FILES if _id(p) not in CONTENT_ONLY], ids=_id)
def test_hostile_file_refused_without_verify(path):
    with pytest.raises(CardFormatError, match=path.name):
        LoRAFormat.load(path, verify=False)


@pytest.mark.parametrize("path", [p for p in FILES if _id(p) not in CONTENT_ONLY], ids=_id)
def test_hostile_file_refused_by_inspect(path):
    with pytest.raises(CardFormatError, match=path.name):
        LoRAFormat.inspect(path)


@pytest.mark.parametrize("name", ["flipped_tensor_byte", "flipped_metadata_byte", "checksum_mismatch"])
def test_inspect_reports_checksum_mismatch(name):
    assert LoRAFormat.inspect(HOSTILE / f"{name}.lora.arrow")["checksum"] == "mismatch"


def test_oversized_metadata_refused(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mg", HOSTILE.parent / "make_golden.py")
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    path = tmp_path / "metadata_value_huge.lora.arrow"
    mg.write_oversized_metadata(path)
    with pytest.raises(CardFormatError, match="metadata entry b'description' is too large"):
        LoRAFormat.load(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CardFormatError, match="no such file"):
        LoRAFormat.load(tmp_path / "absent.lora.arrow")
    with pytest.raises(CardFormatError, match="not a regular file"):
        LoRAFormat.load(tmp_path)


def test_every_truncation_of_a_card_is_refused(tmp_path):
    """Cut the golden v2 card at many lengths: never a crash, never a silent load."""
    data = (HOSTILE.parent / "golden_v2.lora.arrow").read_bytes()
    p = tmp_path / "cut.lora.arrow"
    for n in range(0, len(data), 97):
        p.write_bytes(data[:n])
        with pytest.raises(CardFormatError):
            LoRAFormat.load(p)


def test_random_byte_flips_never_load_silently(tmp_path):
    """Flip single bytes all over the golden card: each load raises CardFormatError or (when
    the flip hits bytes no reader uses, such as padding or the stream's copy of the schema)
    returns the exact golden card."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("mg", HOSTILE.parent / "make_golden.py")
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    expected = mg.expected_v2()
    data = (HOSTILE.parent / "golden_v2.lora.arrow").read_bytes()
    p = tmp_path / "flip.lora.arrow"
    refused = 0
    for i in range(0, len(data), 13):
        b = bytearray(data)
        b[i] ^= 0x5A
        p.write_bytes(bytes(b))
        try:
            card = LoRAFormat.load(p)
        except CardFormatError:
            refused += 1
            continue
        assert card.equal(expected), f"byte {i} flipped yet the card loaded with other content"
    assert refused > len(data) // 13 // 3


@pytest.mark.parametrize("golden", ["golden_v1", "golden_v2"])
def test_random_splices_raise_only_card_format_error(tmp_path, golden):
    """Seeded fuzzing: overwrite, insert and delete random byte runs. Any outcome but a
    CardFormatError or (v2) the exact golden card is a failure; v1 has no checksum, so a
    v1 card may load with damaged tensor bytes, but must never raise anything else."""
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("mg", HOSTILE.parent / "make_golden.py")
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    expected = mg.expected_v2() if golden == "golden_v2" else None
    src = (HOSTILE.parent / f"{golden}.lora.arrow").read_bytes()
    rng = random.Random(1234)
    p = tmp_path / "fuzz.lora.arrow"
    for _ in range(300):
        data = bytearray(src)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(data))
            data[i:i + rng.randint(0, 8)] = bytes(rng.randrange(256) for _ in range(rng.randint(0, 8)))
        p.write_bytes(bytes(data))
        try:
            card = LoRAFormat.load(p)
        except CardFormatError:
            continue
        if expected is not None:
            assert card.equal(expected)
