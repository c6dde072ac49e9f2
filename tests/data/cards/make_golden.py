"""Regenerates the golden cards and the hostile files in this folder.

    python tests/data/cards/make_golden.py

The golden values come from closed-form formulas (no RNG), so tests recompute them from
``expected_v1()`` / ``expected_v2()`` and compare exactly. ``golden_v1.lora.arrow`` is written
the way ArrowEngine's own ``LoRAFormat.save`` writes (NumPy arrays, ``str(dtype)``, a plain
``pa.OSFile``), to show that cards ArrowEngine made load here; ``golden_v2.lora.arrow`` is
written by ``aios_fast.cards.LoRAFormat``. Each file under ``hostile/`` carries one defect
(its name says which) and must be refused with ``CardFormatError``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

HERE = Path(__file__).resolve().parent
HOSTILE = HERE / "hostile"


def _ramp(shape, scale, shift, dtype=np.float32) -> np.ndarray:
    n = int(np.prod(shape))
    return ((np.arange(n, dtype=np.float64) * scale - shift) / 64.0).astype(dtype).reshape(shape)


# ---------------------------------------------------------------------- golden v1
V1_MODULES = ["encoder_layers.0.attention.query", "encoder_layers.0.attention.value"]


def expected_v1() -> dict:
    """What golden_v1 holds, as NumPy arrays (ArrowEngine's view)."""
    A = {m: _ramp((2, 8), 1 + i, 3 + i) for i, m in enumerate(V1_MODULES)}
    B = {m: _ramp((6, 2), 2 + i, 5) for i, m in enumerate(V1_MODULES)}
    return {"name": "golden-v1", "rank": 2, "alpha": 4.0, "target_modules": V1_MODULES,
            "A": A, "B": B, "metadata": {"description": "golden v1 card", "source": "make_golden"}}


def arrowengine_save(e: dict, path: Path) -> None:
    """A faithful re-implementation of ArrowEngine's v1 ``LoRAFormat.save``."""
    meta = {"lora_name": e["name"], "lora_rank": str(e["rank"]), "lora_alpha": str(e["alpha"]),
            "target_modules": ",".join(e["target_modules"])}
    meta.update({str(k): str(v) for k, v in e["metadata"].items()})
    keys = sorted(e["A"])
    schema = pa.schema([("module", pa.string()), ("weight_a", pa.binary()), ("weight_b", pa.binary()),
                        ("shape_a", pa.list_(pa.int32())), ("shape_b", pa.list_(pa.int32())),
                        ("dtype", pa.string())], metadata=meta)
    batch = pa.RecordBatch.from_arrays(
        [pa.array(keys), pa.array([e["A"][k].tobytes() for k in keys]),
         pa.array([e["B"][k].tobytes() for k in keys]), pa.array([e["A"][k].shape for k in keys]),
         pa.array([e["B"][k].shape for k in keys]), pa.array([str(e["A"][k].dtype) for k in keys])],
        schema=schema)
    with pa.OSFile(str(path), "wb") as sink:
        with ipc.new_file(sink, schema) as writer:
            writer.write(batch)


# ---------------------------------------------------------------------- golden v2
def expected_v2():
    """The LoRACard golden_v2 holds: three dtypes, per-module rank and alpha, a fingerprint."""
    from aios_fast.cards import LoRACard

    mods = {"encoder.layer.0.attention.self.query": (2, 8, 6, torch.float32),
            "encoder.layer.0.attention.self.value": (3, 8, 6, torch.float16),
            "encoder.layer.1.output.dense": (2, 4, 5, torch.bfloat16)}
    A, B = {}, {}
    for i, (m, (r, n_in, n_out, dt)) in enumerate(mods.items()):
        A[m] = torch.from_numpy(_ramp((r, n_in), 1 + i, 2)).to(dt)
        B[m] = torch.from_numpy(_ramp((n_out, r), 3 + i, 7)).to(dt)
    return LoRACard(name="golden-v2", rank=2, alpha=8.0, target_modules=sorted(mods),
                    weights_A=A, weights_B=B,
                    metadata={"description": "golden v2 card", "source": "make_golden"},
                    rank_pattern={"encoder.layer.0.attention.self.value": 3},
                    alpha_pattern={"encoder.layer.1.output.dense": 2.5},
                    naming="hf", base_fingerprint="fp1:00112233445566778899aabbccddeeff")


# ---------------------------------------------------------------------- hostile files
def _v2_parts(card=None):
    """(columns dict, metadata dict) of an honest v2 card, to be damaged."""
    from aios_fast.cards.format import _to_table

    t = _to_table(card or expected_v2(), 2)
    return {n: t.column(n).combine_chunks() for n in t.column_names}, \
        {k.decode(): v.decode() for k, v in t.schema.metadata.items()}


def _rechecksum(cols, meta) -> None:
    from aios_fast.cards import spec

    try:
        rows = []
        for i in range(len(cols["module"])):
            rows.append((cols["module"][i].as_py(), cols["dtype_a"][i].as_py(), cols["dtype_b"][i].as_py(),
                         tuple(cols["shape_a"][i].as_py()), tuple(cols["shape_b"][i].as_py()),
                         cols["rank"][i].as_py(), cols["alpha"][i].as_py(),
                         cols["weight_a"][i].as_py(), cols["weight_b"][i].as_py()))
        meta["aios_checksum"] = spec.checksum(rows, {k.encode(): v.encode() for k, v in meta.items()})
    except Exception:  # damaged beyond hashing: structural checks trip first anyway
        pass


def write_oversized_metadata(path: Path) -> None:
    """A card whose description exceeds the per-value metadata limit (made by the test in a
    temporary directory rather than checked in: it is over 2 MB)."""
    from aios_fast.cards import spec

    cols, meta = _v2_parts()
    meta["description"] = "x" * (spec.LIMITS["max_metadata_value_bytes"] + 1)
    _write(path, cols, meta)


def _write(name, cols, meta, *, rechecksum=True, batches=1, compression=None) -> None:
    if rechecksum and "aios_checksum" in meta and all(c in cols for c in ("dtype_a", "rank", "alpha")):
        _rechecksum(cols, meta)
    schema = pa.schema([(n, c.type) for n, c in cols.items()], metadata=meta)
    batch = pa.RecordBatch.from_arrays(list(cols.values()), schema=schema)
    with pa.OSFile(str(HOSTILE / name), "wb") as sink:  # an absolute name replaces the folder
        with ipc.new_file(sink, schema, options=ipc.IpcWriteOptions(compression=compression)) as w:
            for _ in range(batches):
                w.write_batch(batch)


def _replace(cols, name, values, typ=None):
    out = dict(cols)
    out[name] = pa.array(values, typ or cols[name].type)
    return out


def make_hostile() -> list[str]:
    HOSTILE.mkdir(exist_ok=True)
    for old in HOSTILE.glob("*"):
        old.unlink()
    golden = (HERE / "golden_v2.lora.arrow").read_bytes()
    raw = {
        "empty.lora.arrow": b"",
        "not_arrow_text.lora.arrow": b"this is not an arrow file, just some text\n" * 3,
        "not_arrow_json.lora.arrow": json.dumps({"lora_name": "x", "weights": [1, 2]}).encode() * 4,
        "truncated_half.lora.arrow": golden[: len(golden) // 2],
        "truncated_tail.lora.arrow": golden[:-7],
        "truncated_footer.lora.arrow": golden[:-40] + golden[-10:],
        "footer_length_huge.lora.arrow": golden[:-10] + struct.pack("<i", 2**31 - 1) + golden[-6:],
        "footer_length_negative.lora.arrow": golden[:-10] + struct.pack("<i", -5) + golden[-6:],
    }
    # flip one byte of tensor data (A of the first module): only the checksum can tell
    cols, _ = _v2_parts()
    a0 = cols["weight_a"][0].as_py()
    at = golden.index(a0)
    flipped = bytearray(golden)
    flipped[at + 5] ^= 0x40
    raw["flipped_tensor_byte.lora.arrow"] = bytes(flipped)
    old = (HERE / "golden_v2_sha256.lora.arrow").read_bytes()
    flipped = bytearray(old)
    flipped[old.index(a0) + 5] ^= 0x40
    raw["flipped_tensor_byte_sha256.lora.arrow"] = bytes(flipped)
    flipped = bytearray(golden)
    # the footer's copy of the schema (the one readers use; the stream's copy is ignored)
    flipped[golden.rindex(b"golden v2 card") + 3] ^= 0x01  # description metadata
    raw["flipped_metadata_byte.lora.arrow"] = bytes(flipped)
    flipped = bytearray(golden)
    for i in range(len(golden) - 200, len(golden) - 12, 7):  # scramble the footer
        flipped[i] ^= 0xFF
    raw["scrambled_footer.lora.arrow"] = bytes(flipped)
    for name, data in raw.items():
        (HOSTILE / name).write_bytes(data)

    cols, meta = _v2_parts()
    n = len(cols["module"])
    sa, sb = cols["shape_a"].to_pylist(), cols["shape_b"].to_pylist()
    _write("wrong_shape_a.lora.arrow", _replace(cols, "shape_a", [[s[0], s[1] + 1] for s in sa]), meta)
    _write("wrong_shape_b_rank.lora.arrow", _replace(cols, "shape_b", [[s[0] * s[1], 1] for s in sb]), meta)
    _write("huge_declared_shape.lora.arrow",
           _replace(cols, "shape_a", [[2**31 - 1, 2**31 - 1]] * n), meta)
    _write("negative_shape.lora.arrow", _replace(cols, "shape_a", [[-s[0], -s[1]] for s in sa]), meta)
    _write("zero_shape.lora.arrow", _replace(cols, "shape_a", [[0, 0]] * n), meta)
    _write("three_dim_shape.lora.arrow", _replace(cols, "shape_a", [[s[0], s[1], 1] for s in sa]), meta)
    _write("null_in_shape.lora.arrow", _replace(cols, "shape_a", [[s[0], None] for s in sa]), meta)
    for bad in ("float64", "int8", "object", "<f4", "float32\x00", "F" * 300):
        tag = bad.lstrip("<").replace("\x00", "nul")[:12]
        _write(f"dtype_string_{tag}.lora.arrow", _replace(_replace(cols, "dtype_a", [bad] * n), "dtype", [bad] * n), meta)
    _write("dtype_v1_column_disagrees.lora.arrow", _replace(cols, "dtype", ["float16"] * n), meta)
    _write("dtype_b_unknown.lora.arrow", _replace(cols, "dtype_b", ["complex64"] * n), meta)
    # NaN / inf values with a valid checksum: the value scan must catch them
    card = expected_v2()
    k0 = card.modules[0]
    for tag, val in (("nan", float("nan")), ("inf", float("inf"))):
        A = dict(card.weights_A)
        A[k0] = A[k0].clone()
        A[k0][0, 1] = val
        c2, m2 = _v2_parts(_unchecked_card(card, A))
        _write(f"{tag}_values.lora.arrow", c2, m2)
    missing = {k: v for k, v in cols.items() if k != "weight_b"}
    _write("missing_column_weight_b.lora.arrow", missing, meta)
    _write("missing_column_rank.lora.arrow", {k: v for k, v in cols.items() if k != "rank"}, meta)
    _write("wrong_column_type_shape.lora.arrow",
           _replace(cols, "shape_a", sa, pa.list_(pa.int64())), meta)
    _write("wrong_column_type_weight.lora.arrow",
           _replace(cols, "weight_a", cols["weight_a"].to_pylist(), pa.large_binary()), meta)
    _write("null_module.lora.arrow", _replace(cols, "module", [None] + cols["module"].to_pylist()[1:]), meta)
    mods = cols["module"].to_pylist()
    _write("duplicate_modules.lora.arrow", _replace(cols, "module", [mods[0]] * n), meta)
    _write("empty_module_name.lora.arrow", _replace(cols, "module", [""] + mods[1:]), meta)
    _write("rank_column_disagrees.lora.arrow", _replace(cols, "rank", [7] * n), meta)
    _write("alpha_column_nan.lora.arrow", _replace(cols, "alpha", [float("nan")] * n), meta)
    _write("alpha_column_negative.lora.arrow", _replace(cols, "alpha", [-1.0] * n), meta)
    _write("two_record_batches.lora.arrow", cols, meta, batches=2)
    _write("compressed_zstd.lora.arrow", cols, meta, compression="zstd")
    _write("compressed_lz4.lora.arrow", cols, meta, compression="lz4")
    empty = {k: v.slice(0, 0) for k, v in cols.items()}
    _write("zero_rows.lora.arrow", empty, meta)

    def meta_with(**kw):
        m = dict(meta)
        for k, v in kw.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        return m

    _write("checksum_mismatch.lora.arrow", cols,
           meta_with(aios_checksum="sha256:" + "0" * 64), rechecksum=False)
    _write("checksum_missing.lora.arrow", cols, meta_with(aios_checksum=None), rechecksum=False)
    _write("checksum_unknown_algo.lora.arrow", cols, meta_with(aios_checksum="md5:abcd"), rechecksum=False)
    _write("version_unknown.lora.arrow", cols, meta_with(aios_format_version="3"))
    _write("version_key_missing.lora.arrow", cols, meta_with(aios_format_version=None))
    _write("lora_rank_not_a_number.lora.arrow", cols, meta_with(lora_rank="abc"))
    _write("lora_rank_zero.lora.arrow", cols, meta_with(lora_rank="0"))
    _write("lora_alpha_inf.lora.arrow", cols, meta_with(lora_alpha="inf"))
    _write("missing_lora_name.lora.arrow", cols, meta_with(lora_name=None))
    _write("empty_lora_name.lora.arrow", cols, meta_with(lora_name=""))
    _write("naming_unknown.lora.arrow", cols, meta_with(aios_naming="klingon"))
    _write("target_modules_unknown.lora.arrow", cols, meta_with(target_modules="nothing.here"))
    # v1 files: the v1 path has its own checks
    e = expected_v1()
    e["A"] = dict(e["A"])
    e["A"][V1_MODULES[0]] = e["A"][V1_MODULES[0]].astype(np.float64)
    arrowengine_save(e, HOSTILE / "v1_a_float64_b_float32.lora.arrow")
    e = expected_v1()
    e["A"] = dict(e["A"])
    e["A"][V1_MODULES[1]] = e["A"][V1_MODULES[1]].astype("<i4")
    arrowengine_save(e, HOSTILE / "v1_dtype_int32.lora.arrow")
    e = expected_v1()
    e["B"] = {k: np.ascontiguousarray(v[:, :1]) for k, v in e["B"].items()}
    arrowengine_save(e, HOSTILE / "v1_b_rank_mismatch.lora.arrow")
    return sorted(p.name for p in HOSTILE.iterdir())


def _unchecked_card(card, A):
    """A card object holding non-finite values (bypasses validation, as an attacker would)."""
    from aios_fast.cards.card import _SKIP_VALUE_SCAN

    tok = _SKIP_VALUE_SCAN.set(True)
    try:
        return type(card)(name=card.name, rank=card.rank, alpha=card.alpha,
                          target_modules=card.target_modules, weights_A=A, weights_B=card.weights_B,
                          metadata=card.metadata, rank_pattern=card.rank_pattern,
                          alpha_pattern=card.alpha_pattern, naming=card.naming,
                          base_fingerprint=card.base_fingerprint)
    finally:
        _SKIP_VALUE_SCAN.reset(tok)


def main() -> int:
    from aios_fast.cards import LoRAFormat

    arrowengine_save(expected_v1(), HERE / "golden_v1.lora.arrow")
    LoRAFormat.save(expected_v2(), HERE / "golden_v2.lora.arrow")
    # the same card as aios-fast wrote v2 cards before XXH3: readers still verify it
    LoRAFormat.save(expected_v2(), HERE / "golden_v2_sha256.lora.arrow", checksum="sha256")
    names = make_hostile()
    (HERE / "golden.json").write_text(json.dumps(
        {"pyarrow": pa.__version__, "hostile": names}, indent=2) + "\n")
    print(f"wrote golden_v1, golden_v2 and {len(names)} hostile files (pyarrow {pa.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
