"""Every malicious or broken file in tests/data/cards/hostile is refused with CardFormatError
naming the file AND the expected reason, by load (verified or not, where the defect is
structural) and by inspect; seeded fuzzing (truncations, byte flips, splices, and structured
mutations of the schema metadata and columns with a recomputed checksum) never gets anything
but a deliberate refusal or an exact, valid card.

The whole module runs the reader in strict mode (``cards._reader.strict``): an internal
exception (KeyError, IndexError, struct.error, ...) escaping the reader's checks surfaces here
as itself, a bug, instead of passing as "some CardFormatError"."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from aios_fast import CardFormatError
from aios_fast.cards import LoRACard, LoRAFormat
from aios_fast.cards._reader import is_strict, strict

HOSTILE = Path(__file__).parent / "data" / "cards" / "hostile"
FILES = sorted(HOSTILE.glob("*.lora.arrow"))
# defects only the checksum or the value scan can see; verify=False trusts them by design
CONTENT_ONLY = {"flipped_tensor_byte", "flipped_tensor_byte_sha256", "flipped_metadata_byte", "checksum_mismatch",
                "nan_values", "inf_values"}
_ROW = r"row 0 \(module '[^']+'\): "
#: file -> the reason it must be refused for (a regex searched in the message)
REASONS = {
    "alpha_column_nan": _ROW + r"alpha nan must be finite and > 0",
    "alpha_column_negative": _ROW + r"alpha -1\.0 must be finite and > 0",
    "checksum_mismatch": r"checksum mismatch: file says sha256:0{64}",
    "checksum_missing": r"v2 card has no aios_checksum key",
    "checksum_unknown_algo": r"checksum 'md5:abcd' uses an unknown algorithm",
    "compressed_lz4": r"record batch is compressed",
    "compressed_zstd": r"record batch is compressed",
    "dtype_b_unknown": _ROW + r"dtype 'complex64' for weight_b is not one of",
    "dtype_string_FFFFFFFFFFFF": _ROW + r"dtype 'F{40}' for weight_a is not one of",
    "dtype_string_f4": _ROW + r"dtype '<f4' for weight_a is not one of",
    "dtype_string_float32nul": _ROW + r"dtype 'float32\\x00' for weight_a is not one of",
    "dtype_string_float64": _ROW + r"dtype 'float64' for weight_a is not one of",
    "dtype_string_int8": _ROW + r"dtype 'int8' for weight_a is not one of",
    "dtype_string_object": _ROW + r"dtype 'object' for weight_a is not one of",
    "dtype_v1_column_disagrees": _ROW + r"v1 column dtype 'float16' differs from dtype_a 'float32'",
    "duplicate_modules": r"row 1 \(module '[^']+'\): duplicate module",
    "empty": r"file is 0 bytes, too short",
    "empty_lora_name": r"card name must be a non-empty string, got ''",
    "empty_module_name": r"row 0 \(module ''\): module name is empty",
    "flipped_metadata_byte": r"checksum mismatch",
    "flipped_tensor_byte": r"checksum mismatch: file says xxh3-128:[0-9a-f]{32}, content hashes to xxh3-128:",
    "flipped_tensor_byte_sha256": r"checksum mismatch: file says sha256:[0-9a-f]{64}, content hashes to sha256:",
    "footer_length_huge": r"Arrow footer length 2147483647 does not fit",
    "footer_length_negative": r"Arrow footer length -5 does not fit",
    "huge_declared_shape": _ROW + r"shape_a \[2147483647, 2147483647\] x float32 needs \d+ bytes but",
    "inf_values": r"module 'encoder\.layer\.0\.attention\.self\.query', A: contains NaN or infinite",
    "lora_alpha_inf": r"lora_alpha inf out of range",
    "lora_rank_not_a_number": r"lora_rank 'abc' .* are not numbers",
    "lora_rank_zero": r"lora_rank 0 .* out of range",
    "missing_column_rank": r"v2 column 'rank' is missing",
    "missing_column_weight_b": r"v2 column 'weight_b' is missing",
    "missing_lora_name": r"schema metadata key 'lora_name' is missing",
    "naming_unknown": r"aios_naming 'klingon' is not one of",
    "nan_values": r"module 'encoder\.layer\.0\.attention\.self\.query', A: contains NaN or infinite",
    "negative_shape": _ROW + r"shape_a \[-2, -8\] must be 2 positive dims",
    "not_arrow_json": r"not an Arrow IPC file",
    "not_arrow_text": r"not an Arrow IPC file",
    "null_in_shape": _ROW + r"shape_a \[2, None\] must be 2 positive dims",
    "null_module": r"column 'module' has 1 null value",
    "rank_column_disagrees": _ROW + r"shapes \(2, 8\) / \(6, 2\) do not match rank 7",
    "scrambled_footer": r"invalid Arrow IPC footer or schema: .*Footer",
    "target_modules_unknown": r"target_modules do not match the weight keys",
    "three_dim_shape": _ROW + r"shape_a \[2, 8, 1\] must be 2 positive dims",
    "truncated_footer": r"file has 0 record batches",
    "truncated_half": r"not an Arrow IPC file",
    "truncated_tail": r"not an Arrow IPC file",
    "two_record_batches": r"file has 2 record batches",
    "v1_a_float64_b_float32": r"shape_b \[6, 2\] x float64 needs 96 bytes but weight_b holds 48",
    "v1_b_rank_mismatch": r"shapes \(2, 8\) / \(6, 1\) do not match rank 2",
    "v1_dtype_int32": r"row 1 \(module '[^']+'\): dtype 'int32' for weight_a is not one of",
    "version_key_missing": r"has no aios_format_version key \(so v1\) but carries v2 parts",
    "version_unknown": r"aios_format_version is '3'",
    "wrong_column_type_shape": r"column 'shape_a' has type list<item: int64>, expected list<item: int32>",
    "wrong_column_type_weight": r"column 'weight_a' has type large_binary, expected binary",
    "wrong_shape_a": _ROW + r"shape_a \[2, 9\] x float32 needs 72 bytes but weight_a holds 64",
    "wrong_shape_b_rank": _ROW + r"shapes \(2, 8\) / \(12, 1\) do not match rank 2",
    "zero_rows": r"has 0 rows; expected 1\.\.65536 modules",
    "zero_shape": _ROW + r"shape_a \[0, 0\] must be 2 positive dims",
}


@pytest.fixture(autouse=True)
def _strict_reader():
    with strict():
        yield


def _id(p: Path) -> str:
    return p.name.removesuffix(".lora.arrow")


def _refused(path: Path, fn) -> str:
    with pytest.raises(CardFormatError) as info:
        fn(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg  # names the file first
    assert "not a readable .lora.arrow card" not in msg, msg  # a wrapped internal exception
    return msg


def test_hostile_folder_is_complete():
    listed = json.loads((HOSTILE.parent / "golden.json").read_text())["hostile"]
    assert sorted(p.name for p in FILES) == listed and len(FILES) >= 50
    assert sorted(REASONS) == sorted(_id(p) for p in FILES)  # every file has its reason


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_hostile_file_refused_for_its_reason(path):
    msg = _refused(path, LoRAFormat.load)
    assert re.search(REASONS[_id(path)], msg), msg


@pytest.mark.parametrize("path", [p for p in FILES if _id(p) not in CONTENT_ONLY], ids=_id)
def test_hostile_file_refused_without_verify(path):
    msg = _refused(path, lambda p: LoRAFormat.load(p, verify=False))
    assert re.search(REASONS[_id(path)], msg), msg


@pytest.mark.parametrize("path", [p for p in FILES if _id(p) not in CONTENT_ONLY], ids=_id)
def test_hostile_file_refused_by_inspect(path):
    msg = _refused(path, LoRAFormat.inspect)
    assert re.search(REASONS[_id(path)], msg), msg


def test_strict_mode_lets_internal_errors_through(monkeypatch, tmp_path):
    """The switch the tests rely on: strict mode re-raises a reader bug as itself; the user
    API wraps it into a CardFormatError naming the file."""
    from aios_fast.cards import _reader

    def broken(*a, **k):
        raise KeyError("bug")

    monkeypatch.setattr(_reader, "_check_header", broken)
    golden = HOSTILE.parent / "golden_v2.lora.arrow"
    assert is_strict()
    with pytest.raises(KeyError):
        LoRAFormat.load(golden)
    import contextvars

    outside = contextvars.Context()  # a context where strict mode was never entered
    with pytest.raises(CardFormatError, match=r"not a readable .lora.arrow card \(KeyError"):
        outside.run(LoRAFormat.load, golden)


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


# ---------------------------------------------------------------------- seeded fuzzing
_NASTY_META = ["", "0", "-1", "2", "3", "nan", "inf", "-inf", "1e309", "abc", "\u00e9\u0000", "x" * 5000,
               "hf", "arrowengine", "klingon", "sha256:" + "0" * 64, "md5:1", ",", "a,,b", " 2 ", "0x10"]
_NASTY_COL = {
    "module": lambda rng, col: rng.choice(["", "a", "x" * 1100, "q.weight", None, col[0]]),
    "shape_a": lambda rng, col: rng.choice([[], [2], [2, 8, 1], [0, 8], [-1, 8], [2, 2**31 - 1],
                                            [2**31 - 1, 2**31 - 1], [None, 8], [8, 2], None]),
    "shape_b": lambda rng, col: rng.choice([[], [6], [6, 2, 1], [6, 0], [6, -3], [2**31 - 1, 2],
                                            [6, None], [2, 6], None]),
    "dtype": lambda rng, col: rng.choice(["float32", "float16", "bfloat16", "float64", "int8", "",
                                          "float32\x00", "<f4", None]),
    "dtype_a": lambda rng, col: rng.choice(["float32", "float16", "bfloat16", "float64", "int8", "", None]),
    "dtype_b": lambda rng, col: rng.choice(["float32", "float16", "bfloat16", "float64", "int8", "", None]),
    "rank": lambda rng, col: rng.choice([-1, 0, 1, 2, 3, 8, 65536, 65537, 2**31 - 1, None]),
    "alpha": lambda rng, col: rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e-300, 1e308, 2.0, None]),
}


def _parts(path: Path):
    import pyarrow.ipc as ipc

    with ipc.open_file(str(path)) as r:
        t = r.read_all()
    return ({n: t.column(n).combine_chunks() for n in t.column_names},
            {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()})


def _mutate(rng, cols: dict, meta: dict) -> tuple[dict, dict]:
    """One to three structured mutations of the schema metadata or of a column's values."""
    import pyarrow as pa

    cols, meta = dict(cols), dict(meta)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.45:  # metadata value
            meta[rng.choice(sorted(meta))] = rng.choice(_NASTY_META)
        elif kind < 0.55:  # metadata key removed or added
            if rng.random() < 0.5 and meta:
                del meta[rng.choice(sorted(meta))]
            else:
                meta[rng.choice(["aios_extra", "description", "k" * 300, "lora_rank "])] = rng.choice(_NASTY_META)
        else:  # one value of one column
            name = rng.choice([n for n in cols if n in _NASTY_COL])
            col = cols[name].to_pylist()
            col[rng.randrange(len(col))] = _NASTY_COL[name](rng, col)
            cols[name] = pa.array(col, cols[name].type)
    return cols, meta


def _ipc_bytes(cols: dict, meta: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    schema = pa.schema([(n, c.type) for n, c in cols.items()], metadata=meta)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays(list(cols.values()), schema=schema))
    return sink.getvalue().to_pybytes()


def _load_or_refuse(path: Path, expected=None) -> bool:
    """True when refused with a deliberate CardFormatError; False when it loaded, in which case
    the card must be valid (and equal ``expected`` when given). Any other exception is a bug
    and propagates (strict mode)."""
    try:
        card = LoRAFormat.load(path)
    except CardFormatError as exc:
        assert "not a readable .lora.arrow card" not in str(exc), exc
        return True
    assert isinstance(card, LoRACard)
    card.validate()
    if expected is not None:
        assert card.equal(expected)
    return False


def test_seeded_fuzz_truncations_flips_and_structured_mutations(tmp_path):
    """About 3,000 seeded cases in a few seconds: random truncations and byte flips of both
    golden cards, and structured mutations of the schema metadata and column values, with the
    v2 checksum recomputed (most of the time) so that the mutation reaches the structural
    checks behind it."""
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("mg", HOSTILE.parent / "make_golden.py")
    mg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mg)
    rng = random.Random(20261202)
    p = tmp_path / "fuzz.lora.arrow"
    goldens = {g: (HOSTILE.parent / f"{g}.lora.arrow").read_bytes() for g in ("golden_v1", "golden_v2")}
    expected_v2 = mg.expected_v2()
    refused = {"trunc": 0, "flip": 0, "struct": 0}
    counts = {"trunc": 400, "flip": 1200, "struct": 1600}
    for _ in range(counts["trunc"]):
        g = rng.choice(sorted(goldens))
        data = goldens[g]
        p.write_bytes(data[:rng.randrange(len(data))])
        refused["trunc"] += _load_or_refuse(p)
    for _ in range(counts["flip"]):
        g = rng.choice(sorted(goldens))
        b = bytearray(goldens[g])
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] ^= rng.randrange(1, 256)
        p.write_bytes(bytes(b))
        # v1 has no checksum: a flip in tensor bytes may load (with other values); v2 may not
        refused["flip"] += _load_or_refuse(p, expected_v2 if g == "golden_v2" else None)
    parts = {g: _parts(HOSTILE.parent / f"{g}.lora.arrow") for g in goldens}
    for _ in range(counts["struct"]):
        g = rng.choice(sorted(parts))
        cols, meta = _mutate(rng, *parts[g])
        if g == "golden_v2" and rng.random() < 0.8 and all(c in cols for c in ("dtype_a", "rank", "alpha")):
            mg._rechecksum(cols, meta)
        try:
            data = _ipc_bytes(cols, meta)
        except Exception:  # pyarrow refused to write this mutation: nothing to read
            continue
        p.write_bytes(data)
        refused["struct"] += _load_or_refuse(p)
    assert refused["trunc"] == counts["trunc"]  # a cut card never loads
    # most mutations must be refused (the rest hit bytes nobody reads, or harmless metadata)
    assert refused["flip"] > counts["flip"] // 2 and refused["struct"] > counts["struct"] // 2, refused
