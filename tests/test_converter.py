"""ModelConverter: ArrowEngine Parquet layout round trips and refusals, on the real MiniLM weights."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from aios_fast.engines import ModelConverter
from aios_fast.engines import converter as conv
from aios_fast.errors import InputError

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"),
          pytest.param(torch.bfloat16, id="bfloat16")]


@pytest.fixture(scope="module")
def minilm_sd(minilm_dir):
    sd = ModelConverter.load_state_dict(minilm_dir)
    assert len(sd) > 100
    return sd


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_exact(minilm_sd, tmp_path, dtype):
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in minilm_sd.items()}
    out = ModelConverter.to_parquet(sd, tmp_path / "w")
    assert out == tmp_path / "w"
    back = ModelConverter.from_parquet(out)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        # bitwise equality, NaN-safe and exact for bfloat16
        assert torch.equal(back[k].view(torch.uint8) if v.dim() else back[k], v.view(torch.uint8) if v.dim() else v)
    info = ModelConverter.read_metadata(out)["model_info"]
    assert info["num_params"] == sum(v.numel() for v in sd.values())
    assert info["dtypes"] == sorted({conv._NAMES[v.dtype] for v in sd.values()})
    assert info["architecture"] == "unknown"  # a bare state dict says nothing about its model
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left


def test_schema_is_arrowengine_layout(minilm_sd, tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in list(minilm_sd.items())[:5]}
    out = ModelConverter.to_parquet(sd, tmp_path / "w")
    table = pq.read_table(out / "weights.parquet")
    assert table.schema.names == ["layer_name", "shape", "dtype", "data", "num_params"]
    assert table.schema.field("shape").type == pa.list_(pa.int32())
    assert table.schema.field("data").type == pa.binary()
    assert table.schema.field("num_params").type == pa.int64()
    row = table.slice(1, 1).to_pylist()[0]
    name, t = list(sd.items())[1]
    assert row["layer_name"] == name and row["dtype"] == "bfloat16"
    assert row["shape"] == list(t.shape) and row["num_params"] == t.numel()
    # bfloat16 stored as its raw 2-byte words, C order
    assert row["data"] == t.view(torch.int16).numpy().tobytes()
    assert len(row["data"]) == 2 * t.numel()


def test_model_metadata_and_extra_info(hf_minilm, tmp_path):
    out = ModelConverter.to_parquet(hf_minilm, tmp_path / "m", model_info={"source": "all-MiniLM-L6-v2",
                                                                             "num_layers": 6})
    info = json.loads((out / "metadata.json").read_text())["model_info"]
    assert info["architecture"] == "BertModel" and info["model_type"] == "bert"
    assert info["config"]["hidden_size"] == 384
    assert info["source"] == "all-MiniLM-L6-v2" and info["num_layers"] == 6
    assert info["num_params"] == sum(t.numel() for t in hf_minilm.state_dict().values())
    back = ModelConverter.from_parquet(out)
    for k, v in hf_minilm.state_dict().items():
        assert torch.equal(back[k], v), k


def test_mixed_dtypes_scalars_and_empty(tmp_path):
    sd = {"w": torch.randn(3, 4, dtype=torch.float64), "ids": torch.arange(7), "flag": torch.tensor(True),
          "empty": torch.zeros(0, 5, dtype=torch.bfloat16), "scalar": torch.tensor(2.5),
          "noncontig": torch.randn(4, 6).t(), "i8": torch.tensor([-3, 4], dtype=torch.int8)}
    back = ModelConverter.from_parquet(ModelConverter.to_parquet(sd, tmp_path / "x"))
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    assert back["noncontig"].is_contiguous()


def test_overwrite_is_atomic_and_replaces(minilm_sd, tmp_path):
    first = {"a": torch.ones(2)}
    out = ModelConverter.to_parquet(first, tmp_path / "w")
    ModelConverter.to_parquet({"b": torch.zeros(3)}, out)
    assert list(ModelConverter.from_parquet(out)) == ["b"]
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "weights.parquet"]


def test_row_groups_stream_only_wanted_rows(minilm_sd, tmp_path, monkeypatch):
    monkeypatch.setattr(conv, "ROW_GROUP_BYTES", 2 << 20)
    out = ModelConverter.to_parquet(minilm_sd, tmp_path / "w")
    assert pq.ParquetFile(out / "weights.parquet").num_row_groups > 10
    want = ["encoder.layer.3.attention.self.query.weight", "pooler.dense.bias"]
    got = dict(ModelConverter.iter_tensors(out, names=want))
    assert list(got) == want and all(torch.equal(got[k], minilm_sd[k]) for k in want)
    rx = dict(ModelConverter.iter_tensors(out, names=r"^encoder\.layer\.5\."))
    assert len(rx) == 16 and all(k.startswith("encoder.layer.5.") for k in rx)
    assert ModelConverter.list_tensors(out) == list(minilm_sd)


# ------------------------------------------------------------------------------ refusals
def _write_rows(path, rows, schema=None):
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=schema or conv._schema()), path / "weights.parquet")
    return path


def _good_rows(n=4):
    rows = {c: [] for c in conv.COLUMNS}
    for i in range(n):
        t = torch.full((2, 3), float(i))
        rows["layer_name"].append(f"layer.{i}.weight")
        rows["shape"].append([2, 3])
        rows["dtype"].append("float32")
        rows["data"].append(t.numpy().tobytes())
        rows["num_params"].append(6)
    return rows


def test_good_handmade_file_loads(tmp_path):
    back = ModelConverter.from_parquet(_write_rows(tmp_path / "ok", _good_rows()))
    assert torch.equal(back["layer.2.weight"], torch.full((2, 3), 2.0))


@pytest.mark.parametrize("column,value,match", [
    ("data", b"\x00" * 20, r"row 3 \(layer\.3\.weight\): data has 20 bytes.*needs 24"),
    ("dtype", "float8", r"row 3.*dtype 'float8' is unknown"),
    ("shape", [2, -3], r"row 3.*non-negative"),
    ("num_params", 7, r"row 3.*num_params 7 != product"),
    ("shape", [2**31 - 1] * 4, r"row 3.*needs"),  # hostile: huge declared shape, nothing allocated
    ("layer_name", "layer.0.weight", r"row 3.*appears twice"),
], ids=["wrong_byte_count", "unknown_dtype", "negative_dim", "num_params_mismatch", "huge_shape", "duplicate"])
def test_corrupt_rows_are_refused(tmp_path, column, value, match):
    rows = _good_rows()
    rows[column][3] = value
    if column == "shape" and value[0] == 2**31 - 1:
        rows["num_params"][3] = None
    d = _write_rows(tmp_path / "bad", rows)
    with pytest.raises(InputError, match=match) as err:
        ModelConverter.from_parquet(d)
    assert "weights.parquet" in str(err.value)


def test_missing_column_is_refused(tmp_path):
    rows = _good_rows()
    del rows["num_params"]
    schema = pa.schema([f for f in conv._schema() if f.name != "num_params"])
    d = _write_rows(tmp_path / "nocol", rows, schema)
    with pytest.raises(InputError, match=r"weights\.parquet lacks column\(s\) \['num_params'\]"):
        ModelConverter.from_parquet(d)


def test_wrong_column_type_is_refused(tmp_path):
    rows = _good_rows()
    rows["data"] = [b.hex() for b in rows["data"]]
    schema = pa.schema([pa.field("data", pa.string()) if f.name == "data" else f for f in conv._schema()])
    with pytest.raises(InputError, match="column 'data' has type string"):
        ModelConverter.from_parquet(_write_rows(tmp_path / "t", rows, schema))


def test_missing_files_and_non_parquet(tmp_path):
    with pytest.raises(InputError, match=r"weights\.parquet does not exist"):
        ModelConverter.from_parquet(tmp_path)
    (tmp_path / "weights.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        ModelConverter.from_parquet(tmp_path)
    with pytest.raises(InputError, match=r"metadata\.json does not exist"):
        ModelConverter.read_metadata(tmp_path)


@pytest.mark.parametrize("bad", [[1, 2], {"a": np.zeros(2)}, {"a": torch.zeros(2, dtype=torch.complex64)}],
                         ids=["list", "numpy_value", "complex"])
def test_bad_inputs_to_to_parquet(tmp_path, bad):
    with pytest.raises(InputError):
        ModelConverter.to_parquet(bad, tmp_path / "o")
    assert not (tmp_path / "o" / "weights.parquet").exists()
