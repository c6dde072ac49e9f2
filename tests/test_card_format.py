"""LoRACard validation and the .lora.arrow format: round trips, golden files, zero-copy
loading, atomic writes, and ArrowEngine v1 compatibility."""

from __future__ import annotations

import dataclasses

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch

from aios_fast import CardFormatError
from aios_fast.cards import LoRACard, LoRAFormat, fingerprint_model

DATA = Path(__file__).parent / "data" / "cards"


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


golden = _golden_module()

DTYPES = [pytest.param(torch.float32, id="f32"), pytest.param(torch.float16, id="f16"),
          pytest.param(torch.bfloat16, id="bf16")]


def make_card(dtype=torch.float32, ranks=(4, 4, 2), seed=0, **kw) -> LoRACard:
    g = torch.Generator().manual_seed(seed)
    keys = ["layer.0.q", "layer.0.v", "layer.1.out"]
    dims = [(16, 12), (16, 12), (10, 16)]  # (out, in)
    A = {k: torch.randn(r, i, generator=g).to(dtype) for k, r, (o, i) in zip(keys, ranks, dims)}
    B = {k: torch.randn(o, r, generator=g).to(dtype) for k, r, (o, i) in zip(keys, ranks, dims)}
    args = dict(name="skill", rank=ranks[0], alpha=8.0, target_modules=keys, weights_A=A,
                weights_B=B, metadata={"description": "a test skill"},
                rank_pattern={k: r for k, r in zip(keys, ranks) if r != ranks[0]})
    args.update(kw)
    return LoRACard(**args)


# ---------------------------------------------------------------------- LoRACard
def test_card_accessors_and_delta():
    c = make_card(alpha_pattern={"layer.1.out": 3.0})
    assert c.modules == ["layer.0.q", "layer.0.v", "layer.1.out"]
    assert c.module_rank("layer.1.out") == 2 and c.module_rank("layer.0.q") == 4
    assert c.scaling("layer.1.out") == 1.5 and c.scaling("layer.0.q") == 2.0
    d = c.delta("layer.0.q")
    torch.testing.assert_close(d, 2.0 * c.weights_B["layer.0.q"] @ c.weights_A["layer.0.q"])
    assert d.shape == (16, 12)
    assert c.nbytes == sum(t.numel() * 4 for t in [*c.weights_A.values(), *c.weights_B.values()])
    with pytest.raises(KeyError, match="no module 'nope'"):
        c.module_rank("nope")


def test_card_drops_redundant_pattern_entries():
    c = make_card(rank_pattern={"layer.0.v": 4, "layer.1.out": 2}, alpha_pattern={"layer.0.q": 8.0})
    assert c.rank_pattern == {"layer.1.out": 2} and c.alpha_pattern == {}


def _bad(**change):
    base = make_card()
    args = dict(name=base.name, rank=base.rank, alpha=base.alpha,
                target_modules=list(base.target_modules), weights_A=dict(base.weights_A),
                weights_B=dict(base.weights_B), metadata=dict(base.metadata),
                rank_pattern=dict(base.rank_pattern))
    for k, v in change.items():
        args[k] = v(args) if callable(v) else v
    return args


def _set(d, k, v):
    d = dict(d)
    d[k] = v
    return d


BAD_CARDS = [
    pytest.param(_bad(name=""), "name", id="empty-name"),
    pytest.param(_bad(rank=0), "rank", id="rank-zero"),
    pytest.param(_bad(rank=True), "rank", id="rank-bool"),
    pytest.param(_bad(alpha=-1.0), "alpha", id="alpha-negative"),
    pytest.param(_bad(alpha=float("nan")), "alpha", id="alpha-nan"),
    pytest.param(_bad(naming="klingon"), "naming", id="naming-unknown"),
    pytest.param(_bad(metadata={"k": 1}), "metadata", id="metadata-not-str"),
    pytest.param(_bad(metadata={"lora_rank": "3"}), "reserved", id="metadata-reserved"),
    pytest.param(_bad(metadata={"aios_x": "3"}), "reserved", id="metadata-aios-prefix"),
    pytest.param(_bad(weights_B=lambda a: {k: v for k, v in a["weights_B"].items() if k != "layer.0.q"}),
                 "not paired", id="unpaired-keys"),
    pytest.param(_bad(weights_A=lambda a: _set(a["weights_A"], "layer.0.q", torch.zeros(3, 12))),
                 "expected \\(4, in\\)", id="A-wrong-rank"),
    pytest.param(_bad(weights_B=lambda a: _set(a["weights_B"], "layer.0.q", torch.zeros(16, 3))),
                 "expected \\(out, 4\\)", id="B-wrong-rank"),
    pytest.param(_bad(weights_A=lambda a: _set(a["weights_A"], "layer.0.q", torch.zeros(4, 12, 1))),
                 "2-D", id="A-3d"),
    pytest.param(_bad(weights_A=lambda a: _set(a["weights_A"], "layer.0.q", torch.zeros(4, 12, dtype=torch.float64))),
                 "float64", id="dtype-f64"),
    pytest.param(_bad(weights_A=lambda a: _set(a["weights_A"], "layer.0.q", torch.full((4, 12), float("nan")))),
                 "NaN", id="nan-values"),
    pytest.param(_bad(weights_B=lambda a: _set(a["weights_B"], "layer.0.q", torch.full((16, 4), float("inf")))),
                 "infinite", id="inf-values"),
    pytest.param(_bad(target_modules=["layer.0.q"]), "target_modules", id="targets-missing"),
    pytest.param(_bad(target_modules=lambda a: a["target_modules"] + ["mlp.gate"]), "target_modules",
                 id="targets-unknown"),
    pytest.param(_bad(rank_pattern={"nope": 2}), "rank_pattern", id="pattern-unknown-module"),
    pytest.param(_bad(rank_pattern={"layer.1.out": -2}), "rank_pattern", id="pattern-negative"),
    pytest.param(_bad(weights_A=lambda a: _set(a["weights_A"], "layer.0.q", [[0.0]])), "torch.Tensor",
                 id="not-a-tensor"),
]


@pytest.mark.parametrize(("args", "match"), BAD_CARDS)
def test_card_validation_refuses(args, match):
    with pytest.raises(CardFormatError, match=match):
        LoRACard(**args)


def test_card_short_targets_follow_peft_suffix_rule():
    c = make_card(target_modules=["q", "v", "out"])
    assert c.target_modules == ["q", "v", "out"]


def test_with_naming_round_trip():
    A = {"encoder.layer.3.attention.self.query": torch.ones(2, 4)}
    B = {"encoder.layer.3.attention.self.query": torch.ones(4, 2)}
    c = LoRACard("n", 2, 2.0, list(A), A, B)
    ae = c.with_naming("arrowengine")
    assert ae.modules == ["encoder_layers.3.attention.query"] and ae.naming == "arrowengine"
    assert ae.weights_A["encoder_layers.3.attention.query"] is A["encoder.layer.3.attention.self.query"]
    assert ae.with_naming("hf").equal(c)


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", DTYPES)
def test_v2_round_trip_exact(tmp_path, dtype):
    c = make_card(dtype, alpha_pattern={"layer.0.v": 1.25}, naming="hf",
                  base_fingerprint="fp1:abc")
    path = LoRAFormat.save(c, tmp_path / "c.lora.arrow")
    loaded = LoRAFormat.load(path)
    assert loaded.equal(c)
    assert loaded.weights_A["layer.0.q"].dtype == dtype


def test_mixed_dtypes_per_tensor(tmp_path):
    c = make_card()
    c.weights_A["layer.0.q"] = c.weights_A["layer.0.q"].half()
    c.weights_B["layer.1.out"] = c.weights_B["layer.1.out"].bfloat16()
    c.validate()
    loaded = LoRAFormat.load(LoRAFormat.save(c, tmp_path / "m.lora.arrow"))
    assert loaded.equal(c)
    assert LoRAFormat.inspect(tmp_path / "m.lora.arrow")["dtypes"] == ["bfloat16", "float16", "float32"]


def test_v1_v2_v1_round_trip_is_exact(tmp_path):
    """golden v1 (ArrowEngine-written) -> card -> v2 -> card -> v1: same cards, same v1 bytes."""
    src = DATA / "golden_v1.lora.arrow"
    c1 = LoRAFormat.load(src)
    v2 = LoRAFormat.save(c1, tmp_path / "c.v2.lora.arrow")
    c2 = LoRAFormat.load(v2)
    assert c2.equal(c1)
    v1 = LoRAFormat.save(c2, tmp_path / "c.v1.lora.arrow", version=1)
    c3 = LoRAFormat.load(v1)
    assert c3.equal(c1)
    # naming "arrowengine" is inferred from the keys, so no aios_* key is added: the v1 bytes
    # equal what ArrowEngine wrote
    assert v1.read_bytes() == src.read_bytes()


def test_v1_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(CardFormatError, match="bfloat16"):
        LoRAFormat.save(make_card(torch.bfloat16), tmp_path / "x", version=1)
    with pytest.raises(CardFormatError, match="per-module alpha"):
        LoRAFormat.save(make_card(alpha_pattern={"layer.0.v": 2.0}), tmp_path / "x", version=1)
    with pytest.raises(CardFormatError, match="version must be 1 or 2"):
        LoRAFormat.save(make_card(), tmp_path / "x", version=3)
    assert not (tmp_path / "x").exists()


def test_v1_keeps_naming_and_fingerprint_in_metadata(tmp_path):
    c = make_card(base_fingerprint="fp1:feed").with_naming("arrowengine")
    c2 = make_card(base_fingerprint="fp1:feed")
    for card in (c, c2):
        loaded = LoRAFormat.load(LoRAFormat.save(card, tmp_path / "v1.lora.arrow", version=1))
        assert loaded.equal(card)


# ---------------------------------------------------------------------- golden files
def test_golden_v1_exact_values():
    e = golden.expected_v1()
    c = LoRAFormat.load(DATA / "golden_v1.lora.arrow")
    assert (c.name, c.rank, c.alpha, c.naming) == (e["name"], e["rank"], e["alpha"], "arrowengine")
    assert c.metadata == e["metadata"] and c.target_modules == e["target_modules"]
    for m in e["A"]:
        np.testing.assert_array_equal(c.weights_A[m].numpy(), e["A"][m])
        np.testing.assert_array_equal(c.weights_B[m].numpy(), e["B"][m])
    info = LoRAFormat.inspect(DATA / "golden_v1.lora.arrow")
    assert info["version"] == 1 and info["checksum"] == "absent"


def test_golden_v2_exact_values_and_byte_stable_write(tmp_path):
    expected = golden.expected_v2()
    path = DATA / "golden_v2.lora.arrow"
    c = LoRAFormat.load(path)
    assert c.equal(expected)
    assert LoRAFormat.inspect(path)["checksum"] == "ok"
    a = LoRAFormat.save(expected, tmp_path / "a.lora.arrow").read_bytes()
    b = LoRAFormat.save(c, tmp_path / "b.lora.arrow").read_bytes()
    assert a == b  # deterministic writer
    made_with = json.loads((DATA / "golden.json").read_text())["pyarrow"]
    if made_with.split(".")[0] == pa.__version__.split(".")[0]:
        assert a == path.read_bytes()


def test_cards_with_the_older_sha256_checksum_still_verify(tmp_path):
    """golden_v2_sha256 is byte for byte the v2 golden aios-fast wrote before XXH3."""
    path = DATA / "golden_v2_sha256.lora.arrow"
    info = LoRAFormat.inspect(path)
    assert info["checksum"] == "ok" and info["checksum_value"].startswith("sha256:")
    assert LoRAFormat.load(path).equal(golden.expected_v2())
    again = LoRAFormat.save(golden.expected_v2(), tmp_path / "s.lora.arrow", checksum="sha256")
    assert LoRAFormat.inspect(again)["checksum_value"] == info["checksum_value"]
    assert LoRAFormat.inspect(DATA / "golden_v2.lora.arrow")["checksum_value"].startswith("xxh3-128:")
    with pytest.raises(CardFormatError, match=r"checksum must be one of xxh3-128, sha256, got 'md5'"):
        LoRAFormat.save(golden.expected_v2(), tmp_path / "m.lora.arrow", checksum="md5")


def test_xxh3_checksum_is_the_documented_stream(tmp_path):
    """The xxh3-128 checksum rebuilt from docs/card-format.md section 5, independently of the
    writer: the row fields of every row, then all A bytes, then all B bytes, then metadata."""
    import struct

    import xxhash

    card = make_card(torch.bfloat16, ranks=(4, 3, 2))
    path = LoRAFormat.save(card, tmp_path / "x.lora.arrow")
    table = ipc.open_file(str(path)).read_all()
    meta = table.schema.metadata
    rows = table.to_pylist()

    def field(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    stream = b"aios-lora-arrow-v2/xxh3-128"
    for r in rows:
        stream += field(r["module"].encode()) + field(r["dtype_a"].encode()) + field(r["dtype_b"].encode())
        for shape in (r["shape_a"], r["shape_b"]):
            stream += struct.pack("<I", len(shape)) + b"".join(struct.pack("<q", d) for d in shape)
        stream += struct.pack("<qd", r["rank"], r["alpha"])
        stream += struct.pack("<QQ", len(r["weight_a"]), len(r["weight_b"]))
    stream += b"".join(r["weight_a"] for r in rows) + b"".join(r["weight_b"] for r in rows)
    for k in sorted(meta):
        if k != b"aios_checksum":
            stream += field(k) + field(meta[k])
    assert meta[b"aios_checksum"].decode() == "xxh3-128:" + xxhash.xxh3_128(stream).hexdigest()


# ---------------------------------------------------------------------- zero copy
def _mapped_region(path: Path) -> list[tuple[int, int]]:
    regions = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.rstrip().endswith(str(path.resolve())):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            regions.append((lo, hi))
    return regions


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
@pytest.mark.parametrize("dtype", DTYPES)
def test_load_is_zero_copy(tmp_path, dtype):
    c = make_card(dtype, ranks=(16, 16, 16))
    path = LoRAFormat.save(c, tmp_path / "z.lora.arrow")
    before = pa.total_allocated_bytes()
    loaded = LoRAFormat.load(path)
    regions = _mapped_region(path)
    assert regions, "the card file is not memory-mapped"
    for t in [*loaded.weights_A.values(), *loaded.weights_B.values()]:
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        assert any(a <= lo and hi <= b for a, b in regions), "tensor does not view the mapped file"
    assert pa.total_allocated_bytes() - before < 4096  # no tensor bytes copied by Arrow
    # copy-on-write: writing into a loaded tensor never reaches the file
    on_disk = path.read_bytes()
    loaded.weights_A["layer.0.q"].add_(1)
    assert path.read_bytes() == on_disk
    assert LoRAFormat.load(path).equal(c)


def test_misaligned_values_are_copied_not_misread(tmp_path):
    # an odd-sized float16 tensor before a float32 one leaves the float32 bytes unaligned
    A = {"a": torch.arange(3, dtype=torch.float16).reshape(1, 3),
         "b": torch.arange(4, dtype=torch.float32).reshape(1, 4)}
    B = {"a": torch.ones(2, 1, dtype=torch.float16), "b": torch.ones(2, 1)}
    c = LoRACard("m", 1, 1.0, ["a", "b"], A, B)
    loaded = LoRAFormat.load(LoRAFormat.save(c, tmp_path / "m.lora.arrow"))
    assert loaded.equal(c)
    assert loaded.weights_A["b"].data_ptr() % 4 == 0


def test_verify_false_skips_checksum_but_not_structure():
    flipped = DATA / "hostile" / "flipped_tensor_byte.lora.arrow"
    with pytest.raises(CardFormatError, match="checksum mismatch"):
        LoRAFormat.load(flipped)
    c = LoRAFormat.load(flipped, verify=False)  # trusted hot path: loads the flipped bytes
    assert not c.equal(golden.expected_v2())
    with pytest.raises(CardFormatError, match="needs .* bytes"):
        LoRAFormat.load(DATA / "hostile" / "wrong_shape_a.lora.arrow", verify=False)


# ---------------------------------------------------------------------- atomic writes
def test_save_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    """A write that dies half way (here: the IPC writer raises after writing some bytes)
    leaves the previous card intact under the final name and no temporary file behind."""
    import aios_fast.cards.format as fmt

    path = tmp_path / "card.lora.arrow"
    LoRAFormat.save(make_card(seed=1), path)
    old = path.read_bytes()
    real_new_file = fmt.ipc.new_file

    class Boom(Exception):
        pass

    def dying_new_file(sink, schema, **kw):
        sink.write(b"ARROW1\0\0 half a card")
        raise Boom("disk on fire")

    monkeypatch.setattr(fmt.ipc, "new_file", dying_new_file)
    with pytest.raises(Boom):
        LoRAFormat.save(make_card(seed=2), path)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.lora.arrow"]
    monkeypatch.setattr(fmt.ipc, "new_file", real_new_file)
    LoRAFormat.save(make_card(seed=2), path)
    assert LoRAFormat.load(path).equal(make_card(seed=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card.lora.arrow"]


# ---------------------------------------------------------------------- ArrowEngine v1 reader
def arrowengine_v1_load(path):
    """What ArrowEngine's LoRAFormat.load does (faithful re-implementation, NumPy only)."""
    with pa.memory_map(str(path), "r") as source:
        table = ipc.open_file(source).read_all()
        meta = table.schema.metadata
        out = {"name": meta.get(b"lora_name", b"unknown").decode(),
               "rank": int(meta.get(b"lora_rank", b"0").decode()),
               "alpha": float(meta.get(b"lora_alpha", b"1.0").decode()),
               "targets": meta.get(b"target_modules", b"").decode().split(","), "A": {}, "B": {}}
        wa, wb = table.column("weight_a"), table.column("weight_b")
        sa, sb = table.column("shape_a").to_pylist(), table.column("shape_b").to_pylist()
        for i, (m, dt) in enumerate(zip(table.column("module").to_pylist(), table.column("dtype").to_pylist())):
            dtype = np.dtype(dt)
            out["A"][m] = np.frombuffer(wa[i].as_buffer(), dtype=dtype).reshape(sa[i]).copy()
            out["B"][m] = np.frombuffer(wb[i].as_buffer(), dtype=dtype).reshape(sb[i]).copy()
        out["metadata"] = {k.decode(): v.decode() for k, v in meta.items()
                           if k.decode() not in ("lora_name", "lora_rank", "lora_alpha", "target_modules")}
    return out


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("version", [1, 2])
def test_arrowengine_v1_reader_loads_our_cards(tmp_path, dtype, version):
    c = make_card(dtype)
    path = LoRAFormat.save(c, tmp_path / "c.lora.arrow", version=version)
    got = arrowengine_v1_load(path)
    assert (got["name"], got["rank"], got["alpha"]) == ("skill", 4, 8.0)
    assert got["targets"] == c.target_modules
    assert got["metadata"]["description"] == "a test skill"
    for m in c.modules:
        np.testing.assert_array_equal(got["A"][m], c.weights_A[m].numpy())
        np.testing.assert_array_equal(got["B"][m], c.weights_B[m].numpy())


# ---------------------------------------------------------------------- fingerprint
def test_fingerprint_stable_and_sensitive(hf_minilm):
    fp = fingerprint_model(hf_minilm)
    assert fp.startswith("fp1:") and len(fp) == 36
    sd = {k: v.clone() for k, v in hf_minilm.state_dict().items()}
    assert fingerprint_model(sd) == fp  # module and its state dict agree
    assert fingerprint_model(dict(reversed(list(sd.items())))) == fp  # order-independent
    k = "encoder.layer.0.attention.self.query.weight"
    sd[k].view(-1)[0] += 1.0  # index 0 is always sampled
    assert fingerprint_model(sd) != fp
    sd2 = {k: v.half() for k, v in hf_minilm.state_dict().items()}
    assert fingerprint_model(sd2) != fp  # dtype is part of the identity
    sd3 = dict(hf_minilm.state_dict())
    sd3.pop("pooler.dense.bias")
    assert fingerprint_model(sd3) != fp


def test_overwrite_a_card_that_is_loaded(tmp_path):
    """Load a card (its tensors view the mapped file), then save a new card over the same
    path: the loaded tensors keep their values (the old inode stays mapped)."""
    path = tmp_path / "c.lora.arrow"
    first = make_card(seed=1)
    LoRAFormat.save(first, path)
    loaded = LoRAFormat.load(path)
    LoRAFormat.save(make_card(seed=2), path)
    assert loaded.equal(first)
    assert LoRAFormat.load(path).equal(make_card(seed=2))


def test_save_card_on_device_and_move_loaded_card_there(tmp_path, device):
    # every field but the tensors is the original's, so equal() compares the tensors' round trip
    # (the CUDA variant, first run on an H200, once built its copy without the metadata)
    c = make_card(alpha_pattern={"layer.1.out": 3.0})
    on_dev = dataclasses.replace(c, weights_A={k: v.to(device) for k, v in c.weights_A.items()},
                                 weights_B={k: v.to(device) for k, v in c.weights_B.items()})
    loaded = LoRAFormat.load(LoRAFormat.save(on_dev, tmp_path / "g.lora.arrow"))
    assert loaded.equal(c)
    assert all(t.device.type == "cpu" for t in loaded.weights_A.values())
    a = loaded.weights_A["layer.0.q"].to(device, torch.float16)
    assert a.device.type == device
    torch.testing.assert_close(a.float().cpu(), c.weights_A["layer.0.q"].half().float())


def test_writer_refuses_what_readers_would_refuse(tmp_path):
    from aios_fast.cards import spec

    big = make_card(metadata={"report": "x" * (spec.LIMITS["max_metadata_value_bytes"] + 1)})
    with pytest.raises(CardFormatError, match="metadata over the format's limits"):
        LoRAFormat.save(big, tmp_path / "big.lora.arrow")
    assert list(tmp_path.iterdir()) == []


def test_arrowengine_float64_v1_card_loads_as_float32(tmp_path):
    """NumPy's default dtype in a v1 file is converted to float32 (the card's widest dtype)."""
    e = golden.expected_v1()
    e["A"] = {k: v.astype(np.float64) for k, v in e["A"].items()}
    e["B"] = {k: v.astype(np.float64) for k, v in e["B"].items()}
    golden.arrowengine_save(e, tmp_path / "f64.lora.arrow")
    c = LoRAFormat.load(tmp_path / "f64.lora.arrow")
    for m in e["A"]:
        assert c.weights_A[m].dtype == torch.float32
        np.testing.assert_array_equal(c.weights_A[m].numpy(), e["A"][m].astype(np.float32))
        np.testing.assert_array_equal(c.weights_B[m].numpy(), e["B"][m].astype(np.float32))


def test_saved_card_has_ordinary_permissions(tmp_path):
    path = LoRAFormat.save(make_card(), tmp_path / "p.lora.arrow")
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o640)
    LoRAFormat.save(make_card(seed=3), path)  # replacing keeps the file's mode
    assert path.stat().st_mode & 0o777 == 0o640


def test_non_contiguous_tensors_round_trip(tmp_path):
    g = torch.Generator().manual_seed(5)
    A = {"m": torch.randn(12, 4, generator=g).T}  # (4, 12), not contiguous
    B = {"m": torch.randn(4, 9, generator=g)[:, ::2].T.contiguous().T.T}  # (5, 4) view
    assert not A["m"].is_contiguous()
    c = LoRACard("nc", 4, 4.0, ["m"], A, B)
    assert LoRAFormat.load(LoRAFormat.save(c, tmp_path / "nc.lora.arrow")).equal(c)


def test_card_built_the_arrowengine_way_from_numpy(tmp_path, hf_minilm, minilm_tokenizer):
    """Issue 13.6: ArrowEngine builds ``LoRACard(name, rank, alpha, target_modules,
    weights_A={key: np.ndarray}, weights_B=...)`` with its own module names; the card wraps the
    arrays without copying, saves, loads and applies like a torch-built one."""
    import copy

    from aios_fast.lora import LoRAManager

    rng = np.random.default_rng(0)
    keys = [f"encoder_layers.{i}.attention.query" for i in range(2)]
    A = {k: (rng.standard_normal((4, 384)) * 0.05).astype(np.float32) for k in keys}
    B = {k: (rng.standard_normal((384, 4)) * 0.05).astype(np.float32) for k in keys}
    A[keys[0]].flags.writeable = False  # a read-only array (e.g. a mapped file) works too
    card = LoRACard(name="ae", rank=4, alpha=8.0, target_modules=["attention.query"],
                    weights_A=A, weights_B=B, naming="arrowengine")
    for k in keys:  # zero-copy: the card's tensors view the caller's arrays
        assert isinstance(card.weights_A[k], torch.Tensor)
        assert card.weights_A[k].data_ptr() == A[k].ctypes.data
        assert card.weights_B[k].data_ptr() == B[k].ctypes.data
    assert isinstance(A[keys[0]], np.ndarray)  # the caller's dict is left as it was
    back = LoRAFormat.load(LoRAFormat.save(card, tmp_path / "ae.lora.arrow"))
    assert back.equal(card) and back.naming == "arrowengine"

    batch = minilm_tokenizer(["a brindle is a snapshot"], return_tensors="pt")
    model = copy.deepcopy(hf_minilm)
    with torch.no_grad():
        base = model(**batch).last_hidden_state
        with LoRAManager(model).applied(card):
            got = model(**batch).last_hidden_state
        for i, k in enumerate(keys):
            model.encoder.layer[i].attention.self.query.weight += card.delta(k)
        want = model(**batch).last_hidden_state
    assert (want - base).abs().max() > 1e-3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("array, match", [
    (np.zeros((4, 8), np.float64), "NumPy dtype float64 is not allowed"),
    (np.zeros((4, 8), ">f4"), "NumPy dtype >f4 is not allowed"),
    (np.zeros((4, 8), np.int8), "NumPy dtype int8 is not allowed"),
], ids=["float64", "big-endian", "int8"])
def test_numpy_card_with_a_bad_dtype_names_it(array, match):
    with pytest.raises(CardFormatError, match=match):
        LoRACard(name="x", rank=4, alpha=4.0, target_modules=["m"], weights_A={"m": array},
                 weights_B={"m": np.zeros((8, 4), np.float32)})
