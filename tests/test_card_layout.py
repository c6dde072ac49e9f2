"""The compiled card reader (``_C.card_layout``, first in ``LoRAFormat.load``) is a fast path,
not a second judge.

For every file it accepts, the checked pyarrow path accepts the same file and hands over the
same version, metadata and rows; every file the checked path refuses, it declines, so that the
checked path names the reason. Seeded corpora: plainly written cards of both versions and every
dtype, the hostile folder, truncations, byte flips (anywhere, and on every byte of the
FlatBuffers footer and message, which the compiled reader verifies itself), and structured
mutations of the metadata and column values. Cards written with other valid Arrow choices
(non-nullable fields, another list item name, field metadata) are declined and load through
the checked path with the same content; Arrow's previous metadata version is read by both.

Runs in strict mode: an internal exception in either path surfaces as itself."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from test_card_columns import _MODULES, _card, _mutate, _parts, _write

from aios_fast import _native
from aios_fast.cards import LoRAFormat
from aios_fast.cards import _reader

pytestmark = pytest.mark.skipif(not _native.has("card_layout"),
                                reason="aios_fast._C has no card_layout (rebuild: pip install .)")

CARDS = Path(__file__).parent / "data" / "cards"
# defects only the checksum or the value scan can see: structurally plain cards
CONTENT_ONLY = {"flipped_tensor_byte", "flipped_metadata_byte", "checksum_mismatch", "nan_values", "inf_values"}


@pytest.fixture(autouse=True)
def _strict_reader():
    with _reader.strict():
        yield


def _judge(file: Path | bytes) -> tuple[bool, bool]:
    """(compiled reader accepted, checked path accepted) for a file or its bytes, asserting
    that the compiled reader accepts nothing the checked path refuses and returns exactly its
    result. (Both read any buffer; bytes spare the fuzzing a file per case.)"""
    if isinstance(file, Path):
        try:
            _, data = _reader._map(file)
        except _reader._Bad:
            return False, False
    elif len(file) < 32:  # what _map refuses before either path runs
        return False, False
    else:
        data = file
    fast = _reader._layout_fast(data)
    try:
        checked = _reader._layout_checked(data)
    except _reader._Bad as exc:
        assert fast is None, f"the compiled reader accepted a file the checked path refuses: {exc}"
        return False, False
    if fast is not None:
        assert fast[:3] == checked[:3]  # version, raw metadata, metadata
        for field in _reader._Rows.__slots__:
            assert getattr(fast[3], field) == getattr(checked[3], field), field
    return fast is not None, True


def _plain_cards(tmp_path: Path) -> list[Path]:
    out = [CARDS / "golden_v1.lora.arrow", CARDS / "golden_v2.lora.arrow"]
    for i, (dtype, version) in enumerate([(torch.float32, 2), (torch.float16, 2), (torch.bfloat16, 2),
                                          (torch.float32, 1), (torch.float16, 1)]):
        card = _card(dtype, seed=i, ranks={_MODULES[1]: 2} if version == 2 else None)
        out.append(LoRAFormat.save(card, tmp_path / f"plain{i}.lora.arrow", version=version))
    mixed = _card(torch.float16, seed=9)
    mixed.weights_B[_MODULES[0]] = mixed.weights_B[_MODULES[0]].to(torch.bfloat16)  # A and B differ
    mixed.alpha_pattern = {_MODULES[2]: 3.5}
    out.append(LoRAFormat.save(mixed, tmp_path / "mixed.lora.arrow"))
    return out


def test_plain_cards_take_the_compiled_path_with_the_checked_result(tmp_path, monkeypatch):
    paths = _plain_cards(tmp_path)
    assert [_judge(p) for p in paths] == [(True, True)] * len(paths)
    fast = [LoRAFormat.load(p) for p in paths]
    monkeypatch.setattr(_reader, "_CARD_LAYOUT", None)  # as without the compiled module
    assert all(a.equal(LoRAFormat.load(p)) for a, p in zip(fast, paths))


def test_hostile_files_are_left_to_the_checked_path():
    """Files with a structural defect are declined; those whose defect lies beyond the rows
    (header keys, checksum, values, targets) give both paths the same rows, and the common
    checks after them refuse the card (tests/test_card_hostile.py)."""
    hostile = sorted((CARDS / "hostile").glob("*.lora.arrow"))
    judged = {p.name.removesuffix(".lora.arrow"): _judge(p) for p in hostile}
    assert len(judged) >= 50
    assert all(judged[k] == (True, True) for k in CONTENT_ONLY)
    declined = [k for k, (fast, _) in judged.items() if not fast]
    assert len(declined) >= 35 and {"compressed_lz4", "two_record_batches", "wrong_column_type_shape",
                                    "null_module", "duplicate_modules", "scrambled_footer"} <= set(declined)


def _regions(data: bytes) -> list[int]:
    """Byte positions of the footer and of the record batch's message (FlatBuffers)."""
    size = len(data)
    footer_len = struct.unpack_from("<i", data, size - 10)[0]
    footer = range(size - 10 - footer_len, size - 6)
    root = struct.unpack_from("<I", data, footer.start)[0] + footer.start
    vtable = root - struct.unpack_from("<i", data, root)[0]
    slot = struct.unpack_from("<H", data, vtable + 4 + 2 * 3)[0]  # recordBatches
    vec = root + slot + struct.unpack_from("<I", data, root + slot)[0]
    offset, meta_len = struct.unpack_from("<qi", data, vec + 4)
    return [*range(offset, offset + meta_len), *footer]


@pytest.mark.parametrize("golden", ["golden_v1", "golden_v2"])
def test_every_metadata_byte_flipped(golden):
    """Each byte of the footer and the message, flipped two ways: the verifier's rules
    (offsets, vtables, alignment, strings, vector lengths) against pyarrow's."""
    data = (CARDS / f"{golden}.lora.arrow").read_bytes()
    seen = {(True, True): 0, (False, True): 0, (False, False): 0}
    for i in _regions(data):
        for mask in (0x01, 0x80, 0xA5, 0xFF):
            b = bytearray(data)
            b[i] ^= mask
            seen[_judge(bytes(b))] += 1
    # most flips break the metadata; some hit padding or values no reader uses
    assert seen[(False, False)] > 2000 and seen[(True, True)] > 40, seen


def test_seeded_truncations_flips_and_mutations(tmp_path):
    rng = random.Random(20261203)
    sources = [p.read_bytes() for p in _plain_cards(tmp_path)]
    p = tmp_path / "fuzz.lora.arrow"
    seen = {(True, True): 0, (False, True): 0, (False, False): 0}
    for _ in range(300):
        data = rng.choice(sources)
        assert _judge(data[:rng.randrange(len(data))]) == (False, False)  # a cut card never loads
    for _ in range(2000):
        b = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        seen[_judge(bytes(b))] += 1
    parts = []
    for i, (dtype, version) in enumerate([(torch.float32, 2), (torch.bfloat16, 2), (torch.float16, 1)]):
        src = LoRAFormat.save(_card(dtype, seed=i), tmp_path / f"src{i}.lora.arrow", version=version)
        parts.append((version, *_parts(src)))
    for _ in range(500):
        version, cols, meta = rng.choice(parts)
        try:
            _write(p, _mutate(rng, cols), dict(meta), version)
        except (pa.ArrowException, OverflowError):  # pyarrow will not write this value
            continue
        seen[_judge(p)] += 1
    assert seen[(True, True)] > 100 and seen[(False, False)] > 100, seen


def _rewrite(src: Path, dst: Path, field_fn) -> Path:
    with ipc.open_file(str(src)) as r:
        t = r.read_all()
    schema = pa.schema([field_fn(f) for f in t.schema], metadata=t.schema.metadata)
    with ipc.new_file(str(dst), schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays([t.column(i).combine_chunks() for i in range(t.num_columns)],
                                                 schema=schema))
    return dst


@pytest.mark.parametrize("variant", ["not_nullable", "list_item_named_element", "field_metadata", "metadata_v4"])
def test_other_valid_arrow_choices_load_through_the_checked_path(tmp_path, variant):
    card = _card(torch.float32)
    src = LoRAFormat.save(card, tmp_path / "src.lora.arrow")
    dst = tmp_path / f"{variant}.lora.arrow"
    if variant == "not_nullable":
        _rewrite(src, dst, lambda f: f.with_nullable(False))
    elif variant == "list_item_named_element":
        _rewrite(src, dst, lambda f: f.with_type(pa.list_(pa.field("element", pa.int32())))
                 if f.name.startswith("shape_") else f)
    elif variant == "field_metadata":
        _rewrite(src, dst, lambda f: f.with_metadata({"note": "x"}))
    else:  # Arrow's previous metadata version, which pyarrow still reads
        with ipc.open_file(str(src)) as r:
            t = r.read_all()
        opts = ipc.IpcWriteOptions(metadata_version=ipc.MetadataVersion.V4)
        with ipc.new_file(str(dst), t.schema, options=opts) as w:
            w.write_table(t)
    fast, checked = _judge(dst)
    assert checked and fast == (variant == "metadata_v4")
    assert LoRAFormat.load(dst).equal(card)
