"""The card reader's whole-column fast paths agree with its row-by-row checks.

In the checked (pyarrow) path, ``_reader._rows_by_column`` judges every row at once and hands
over to the row-by-row pass (``_rows_by_row``, which names the first bad row) whenever a row
might be bad; the value scan reads each tensor column's values buffer at once. Seeded
structured mutations of real cards check that the column checks never accept a card the row
checks refuse, and return exactly the rows those checks return; NaN/inf planted at either end
of a column is found for every dtype, and the largest finite values are not mistaken for it."""

from __future__ import annotations

import random
import struct

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from aios_fast import CardFormatError
from aios_fast.cards import LoRACard, LoRAFormat, spec
from aios_fast.cards import _reader
from aios_fast.cards.card import _SKIP_VALUE_SCAN

_MODULES = [f"encoder.layer.{i}.attention.self.{p}" for i in range(3) for p in ("query", "value")]


def _card(dtype: torch.dtype, seed: int = 0, ranks=None) -> LoRACard:
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or {}
    A = {m: torch.randn(ranks.get(m, 4), 12, generator=g).to(dtype) for m in _MODULES}
    B = {m: torch.randn(10, ranks.get(m, 4), generator=g).to(dtype) for m in _MODULES}
    return LoRACard("cols", 4, 8.0, list(_MODULES), A, B, rank_pattern=ranks)


def _parts(path):
    with ipc.open_file(str(path)) as r:
        t = r.read_all()
    return ({n: t.column(n).combine_chunks() for n in t.column_names},
            {k.decode(): v.decode() for k, v in (t.schema.metadata or {}).items()})


def _write(path, cols: dict, meta: dict, version: int) -> None:
    if version == 2:  # recompute the checksum, so that the mutation reaches the structural checks
        n = len(cols["module"])
        rows = [(cols["module"][i].as_py(), cols["dtype_a"][i].as_py(), cols["dtype_b"][i].as_py(),
                 tuple(cols["shape_a"][i].as_py()), tuple(cols["shape_b"][i].as_py()),
                 cols["rank"][i].as_py(), cols["alpha"][i].as_py(),
                 cols["weight_a"][i].as_py(), cols["weight_b"][i].as_py()) for i in range(n)]
        try:
            meta[spec.KEY_CHECKSUM] = spec.checksum(rows, {k.encode(): v.encode() for k, v in meta.items()})
        except (TypeError, struct.error):  # damaged beyond hashing: the structural checks refuse it
            pass
    schema = pa.schema([(n, c.type) for n, c in cols.items()], metadata=meta)
    with ipc.new_file(str(path), schema) as w:
        w.write_batch(pa.RecordBatch.from_arrays(list(cols.values()), schema=schema))


#: per column, values a hostile or careless writer might put in one row
_VALUES = {
    "module": lambda rng, col: rng.choice(["", col[0], "m.weight", "x" * 300, "\u20ac" * 300, "\u20ac" * 341,
                                           "y" * 1024, "y" * 1025, "fresh.name"]),
    "shape_a": lambda rng, col: rng.choice([[], [4], [4, 12, 1], [0, 12], [-4, 12], [4, None], [4, 13],
                                            [12, 4], [2, 24], [8, 6], [2**31 - 1, 2**31 - 1], [3, 16]]),
    "shape_b": lambda rng, col: rng.choice([[], [10], [10, 4, 1], [10, 0], [10, -4], [None, 4], [5, 8],
                                            [20, 2], [40, 1], [2**31 - 1, 4], [10, 3]]),
    "dtype": lambda rng, col: rng.choice(["float32", "float16", "bfloat16", "float64", "int8", "", "<f4"]),
    "dtype_a": lambda rng, col: rng.choice(["float32", "float16", "bfloat16", "float64", "complex64"]),
    "dtype_b": lambda rng, col: rng.choice(["float32", "float16", "bfloat16", "float64", "complex64"]),
    "rank": lambda rng, col: rng.choice([-1, 0, 1, 2, 3, 4, 8, 65536, 65537, 2**31 - 1]),
    "alpha": lambda rng, col: rng.choice([float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 5e-324,
                                          1e308, 2.0, 8.0]),
    "weight_a": lambda rng, col: rng.choice([b"", col[0][:-2], col[0] + b"\0\0", col[0] * 2, col[0][:len(col[0]) // 2]]),
    "weight_b": lambda rng, col: rng.choice([b"", col[0][:-4], col[0] + b"\0" * 4, col[0] * 2]),
}


#: changes that leave every row valid (the card as a whole may still be refused)
_BENIGN = {
    "module": lambda rng, col: rng.choice(["fresh.name", "x" * 300, "\u20ac" * 341, "y" * 1024]),
    "alpha": lambda rng, col: rng.choice([2.0, 5e-324, 1e308]),
    "dtype_b": lambda rng, col: {"float16": "bfloat16", "bfloat16": "float16"}.get(col[0], col[0]),
    "rank": lambda rng, col: col[0],
}


def _mutate(rng, cols: dict) -> dict:
    cols = dict(cols)
    if rng.random() < 0.4:
        name = rng.choice([n for n in cols if n in _BENIGN])
        col = cols[name].to_pylist()
        col[rng.randrange(len(col))] = _BENIGN[name](rng, col)
        cols[name] = pa.array(col, cols[name].type)
        return cols
    if rng.random() < 0.1:  # one row with every dim negated: sizes and (v1) ranks still agree
        i = rng.randrange(len(cols["module"]))
        for name in ("shape_a", "shape_b"):
            col = cols[name].to_pylist()
            col[i] = [-d for d in col[i]]
            cols[name] = pa.array(col, cols[name].type)
        return cols
    for _ in range(rng.randint(1, 3)):
        name = rng.choice([n for n in cols if n in _VALUES])
        col = cols[name].to_pylist()
        col[rng.randrange(len(col))] = _VALUES[name](rng, col)
        cols[name] = pa.array(col, cols[name].type)
    return cols


@pytest.fixture
def agreement(monkeypatch):
    """Wrap ``_rows_by_column``: whenever it accepts, the row-by-row pass must accept the same
    input and return the same rows. Counts how often each path decided. The compiled reader is
    switched off, so that every card goes through these checks (tests/test_card_layout.py holds
    the compiled reader to the same standard)."""
    monkeypatch.setattr(_reader, "_CARD_LAYOUT", None)
    real = _reader._rows_by_column
    seen = {"column": 0, "row": 0}

    def checked(cols, version, starts):
        got = real(cols, version, starts)
        if got is None:
            seen["row"] += 1
            return None
        seen["column"] += 1
        try:
            ref = _reader._rows_by_row(cols, version, starts)
        except _reader._Bad as exc:
            raise AssertionError(f"the column checks accepted rows the row checks refuse: {exc}") from None
        for field in _reader._Rows.__slots__:
            assert getattr(got, field) == getattr(ref, field), field
        return got

    monkeypatch.setattr(_reader, "_rows_by_column", checked)
    with _reader.strict():
        yield seen


def test_column_checks_never_accept_what_row_checks_refuse(tmp_path, agreement):
    sources = []
    for i, (dtype, version) in enumerate([(torch.float32, 2), (torch.float16, 2), (torch.bfloat16, 2),
                                          (torch.float32, 1), (torch.float16, 1)]):
        card = _card(dtype, seed=i, ranks={_MODULES[1]: 2} if version == 2 else None)
        path = LoRAFormat.save(card, tmp_path / f"src{i}.lora.arrow", version=version)
        sources.append((version, card, *_parts(path)))
    rng = random.Random(20260313)
    p = tmp_path / "mut.lora.arrow"
    outcomes = {"refused": 0, "loaded": 0}
    for _ in range(600):
        version, card, cols, meta = rng.choice(sources)
        try:
            mutated = _mutate(rng, cols)
            _write(p, mutated, dict(meta), version)
        except (pa.ArrowException, OverflowError):  # pyarrow will not write this value
            continue
        try:
            loaded = LoRAFormat.load(p)
        except CardFormatError as exc:
            assert "not a readable .lora.arrow card" not in str(exc), exc
            outcomes["refused"] += 1
            continue
        outcomes["loaded"] += 1
        loaded.validate()
    # both paths decided many cards, and the mutations both broke and spared cards
    assert agreement["column"] > 100 and agreement["row"] > 100, agreement
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 50, outcomes


def test_unmutated_cards_take_the_column_path(tmp_path, agreement):
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        card = _card(dtype, seed=i, ranks={_MODULES[2]: 3})
        loaded = LoRAFormat.load(LoRAFormat.save(card, tmp_path / f"c{i}.lora.arrow"))
        assert loaded.equal(card)
    assert agreement == {"column": 3, "row": 0}


def _planted(dtype: torch.dtype, side: str, index: int, value: float) -> LoRACard:
    """A card with ``value`` written into tensor ``side`` of the first or last module, at its
    first or last element (``index`` 0 or -1), built without the value scan."""
    card = _card(dtype)
    module = _MODULES[index]
    tensors = {k: v.clone() for k, v in (card.weights_A if side == "A" else card.weights_B).items()}
    flat = tensors[module].view(-1)
    flat[index] = value
    tok = _SKIP_VALUE_SCAN.set(True)
    try:
        return LoRACard(card.name, card.rank, card.alpha, card.target_modules,
                        tensors if side == "A" else card.weights_A, tensors if side == "B" else card.weights_B)
    finally:
        _SKIP_VALUE_SCAN.reset(tok)


def _save_unscanned(card: LoRACard, path):
    tok = _SKIP_VALUE_SCAN.set(True)  # the writer validates too; an attacker's would not
    try:
        return LoRAFormat.save(card, path)
    finally:
        _SKIP_VALUE_SCAN.reset(tok)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=str)
@pytest.mark.parametrize("side,index", [("A", 0), ("A", -1), ("B", 0), ("B", -1)])
def test_value_scan_finds_non_finite_at_either_end_of_a_column(tmp_path, dtype, value, side, index):
    path = _save_unscanned(_planted(dtype, side, index, value), tmp_path / "bad.lora.arrow")
    with pytest.raises(CardFormatError, match=rf"module '{_MODULES[index]}', {side}: contains NaN or infinite"):
        LoRAFormat.load(path)
    assert LoRAFormat.load(path, verify=False).weights_A  # verify=False trusts values by design


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_value_scan_accepts_the_largest_finite_values(tmp_path, dtype):
    big = torch.finfo(dtype).max
    card = _planted(dtype, "B", -1, -big)
    card.weights_A[_MODULES[0]].view(-1)[0] = big
    card.weights_A[_MODULES[1]].view(-1)[0] = torch.finfo(dtype).tiny / 2  # a subnormal
    loaded = LoRAFormat.load(LoRAFormat.save(card, tmp_path / "big.lora.arrow"))
    assert loaded.equal(card)
