"""Checkpoint readers (load_state_dict / iter_tensors / list_tensors) on real files: the bundled
MiniLM (safetensors, made-up shards, .bin, Parquet) and the bundled SmolLM2 GGUF."""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from aios_fast.engines import ModelConverter
from aios_fast.engines.checkpoints import checkpoint_kind
from aios_fast.errors import InputError


@pytest.fixture(scope="module")
def minilm_ref(minilm_dir):
    return load_file(str(minilm_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def sharded_dir(minilm_ref, tmp_path_factory):
    """MiniLM split into two safetensors shards plus a transformers-style index."""
    d = tmp_path_factory.mktemp("sharded")
    names = list(minilm_ref)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: minilm_ref[n].contiguous() for n in part}, str(d / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.nbytes for t in minilm_ref.values())}, "weight_map": weight_map}))
    return d


def _assert_same(got, ref):
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_transformers_dir(minilm_dir, minilm_ref, hf_minilm):
    sd = ModelConverter.load_state_dict(minilm_dir)
    _assert_same(sd, minilm_ref)
    # the names are the transformers model's own state_dict names (the file also keeps the
    # position_ids buffer that older transformers saved)
    assert set(sd) - {"embeddings.position_ids"} == set(hf_minilm.state_dict())


def test_single_safetensors_file(minilm_dir, minilm_ref):
    assert checkpoint_kind(minilm_dir / "model.safetensors")[0] == "safetensors"
    _assert_same(ModelConverter.load_state_dict(minilm_dir / "model.safetensors"), minilm_ref)


@pytest.mark.parametrize("which", ["directory", "index_file"])
def test_sharded_safetensors(sharded_dir, minilm_ref, which):
    path = sharded_dir if which == "directory" else sharded_dir / "model.safetensors.index.json"
    assert checkpoint_kind(path)[0] == "sharded"
    _assert_same(ModelConverter.load_state_dict(path), minilm_ref)
    assert sorted(ModelConverter.list_tensors(path)) == sorted(minilm_ref)


def test_iter_tensors_is_lazy_and_filtered(sharded_dir, minilm_ref):
    it = ModelConverter.iter_tensors(sharded_dir, names=r"\.attention\.self\.query\.weight$")
    assert isinstance(it, types.GeneratorType)
    first_name, first = next(it)
    assert first_name.endswith("query.weight") and torch.equal(first, minilm_ref[first_name])
    rest = dict(it)
    assert len(rest) + 1 == 6
    pick = ["encoder.layer.0.output.dense.weight", "embeddings.word_embeddings.weight"]
    got = ModelConverter.load_state_dict(sharded_dir, include=pick)
    assert set(got) == set(pick)
    only_bias = ModelConverter.load_state_dict(sharded_dir, include=lambda n: n.endswith(".bias"))
    assert only_bias and all(k.endswith(".bias") for k in only_bias)


def test_unknown_names_are_refused_up_front(sharded_dir):
    with pytest.raises(InputError, match=r"no tensor\(s\) \['encoder\.layer\.99\.nope'\]"):
        ModelConverter.iter_tensors(sharded_dir, names=["encoder.layer.99.nope"])
    with pytest.raises(InputError, match="not a valid regex"):
        ModelConverter.iter_tensors(sharded_dir, names="(unclosed")


def test_index_with_missing_or_escaping_shard(sharded_dir, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(sharded_dir, d)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="names shard model-00002-of-00002.safetensors, which does not exist"):
        ModelConverter.load_state_dict(d)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    index["weight_map"]["pooler.dense.bias"] = "../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="lies outside"):
        ModelConverter.load_state_dict(d)


def test_pytorch_bin_and_parquet_dirs(minilm_ref, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(minilm_ref, bin_dir / "pytorch_model.bin")
    _assert_same(ModelConverter.load_state_dict(bin_dir), minilm_ref)
    pq_dir = ModelConverter.to_parquet(minilm_ref, tmp_path / "pq")
    assert checkpoint_kind(pq_dir)[0] == "parquet"
    _assert_same(ModelConverter.load_state_dict(pq_dir), minilm_ref)
    _assert_same(ModelConverter.load_state_dict(pq_dir / "weights.parquet"), minilm_ref)


def test_corrupt_safetensors_and_unknown_paths(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(InputError, match="bad.safetensors"):
        ModelConverter.load_state_dict(bad)
    with pytest.raises(InputError, match="does not exist"):
        ModelConverter.load_state_dict(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unknown checkpoint kind"):
        ModelConverter.load_state_dict(tmp_path / "notes.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="holds no weights"):
        ModelConverter.load_state_dict(empty)


# ------------------------------------------------------------------------------ GGUF
@pytest.fixture(scope="module")
def smollm_state():
    from aios_fast.engines import CausalLM

    return CausalLM().model.state_dict()


def test_gguf_names_shapes_and_values_match_causal_lm(smollm2_gguf, smollm_state):
    """Dequantised GGUF tensors, renamed to Hugging Face names (Q/K un-permuted, tied lm_head)."""
    names = ModelConverter.list_tensors(smollm2_gguf)
    assert set(names) == set(smollm_state)
    assert "model.layers.29.self_attn.k_proj.weight" in names and "lm_head.weight" in names
    sd = ModelConverter.load_state_dict(smollm2_gguf)
    for k, v in smollm_state.items():
        assert sd[k].shape == v.shape and sd[k].dtype == torch.float32, k
        assert torch.equal(sd[k], v), k
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]


def test_gguf_streams_selected_modules(smollm2_gguf, smollm_state):
    want = ["model.layers.7.mlp.down_proj.weight", "lm_head.weight"]
    got = list(ModelConverter.iter_tensors(smollm2_gguf, names=want))
    assert sorted(n for n, _ in got) == sorted(want)
    for n, t in got:
        assert torch.equal(t, smollm_state[n])


def test_gguf_reader_without_transformers_private_loader_says_what_to_install(monkeypatch, tmp_path):
    """Issue 13.13: the private ``transformers.modeling_gguf_pytorch_utils`` import is guarded:
    a transformers without it gives a clear BackendUnavailableError, not an ImportError."""
    import sys

    from aios_fast.engines.checkpoints import _GGUFIndex
    from aios_fast.errors import BackendUnavailableError

    monkeypatch.setitem(sys.modules, "transformers.modeling_gguf_pytorch_utils", None)  # import fails
    with pytest.raises(BackendUnavailableError, match=r"modeling_gguf_pytorch_utils.*transformers>=4\.56"):
        _GGUFIndex(tmp_path / "model.gguf")
