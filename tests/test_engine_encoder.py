"""SentenceEncoder against sentence-transformers on the bundled all-MiniLM-L6-v2 (offline)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from aios_fast.engines import SentenceEncoder
from aios_fast.errors import InputError

TEXTS = {
    "short": ["hello world", "a", "The quick brown fox jumps over the lazy dog."],
    "empty_string": ["", "not empty", ""],
    "long_over_max_length": ["word " * 600, "tokens " * 300 + "end", "short one"],
    "unicode": ["Ünïcødé façade naïve", "日本語のテキスト", "emoji 🙂🚀 and Ελληνικά", "  padded  "],
    "mixed_lengths": [("sentence number %d " % i) * (i % 7 + 1) for i in range(14)],
}


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def _st_unnormalised(st):
    from sentence_transformers import SentenceTransformer

    # the directory's Transformer + Pooling without its Normalize module
    return SentenceTransformer(modules=[st[0], st[1]], device="cpu")


def test_defaults(encoder):
    assert encoder.dim == 384
    assert encoder.max_length == 256
    assert encoder.pooling.modes == ("mean",) and encoder.pooling.normalize
    assert type(encoder.model).__name__ == "BertModel"
    assert not encoder.model.training
    assert encoder.device == torch.device("cpu")


@pytest.mark.parametrize("kind", list(TEXTS))
def test_matches_sentence_transformers_normalised(encoder, st_model, kind):
    texts = TEXTS[kind]
    ours = encoder.encode(texts, batch_size=8)
    ref = torch.from_numpy(st_model.encode(texts, batch_size=8))
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"
    assert ours.shape == (len(texts), 384)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=1), torch.ones(len(texts)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["short", "unicode", "long_over_max_length"])
def test_matches_sentence_transformers_unnormalised(encoder, st_model, kind):
    texts = TEXTS[kind]
    ours = encoder.encode(texts, normalize=False)
    ref = torch.from_numpy(_st_unnormalised(st_model).encode(texts))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert (ours.norm(dim=1) - 1).abs().max() > 0.5  # really not normalised


def test_normalize_none_follows_directory(encoder):
    texts = TEXTS["short"]
    torch.testing.assert_close(encoder.encode(texts, normalize=None), encoder.encode(texts, normalize=True))


def test_batch_size_and_order_do_not_change_results(encoder):
    texts = TEXTS["mixed_lengths"]
    one = encoder.encode(texts[:6], batch_size=1)
    big = encoder.encode(texts, batch_size=64)
    torch.testing.assert_close(one, big[:6], atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode(texts[::-1], batch_size=5), big.flip(0), atol=1e-5, rtol=0)


def test_empty_list_and_single_string(encoder):
    assert encoder.encode([]).shape == (0, 384)
    single = encoder.encode("hello world")
    assert single.shape == (1, 384)
    torch.testing.assert_close(single[0], encoder.encode(["hello world", "x"])[0], atol=1e-6, rtol=0)


def test_long_text_is_truncated_to_max_length(encoder):
    batch = encoder.tokenize(["word " * 600, "hi"])
    assert batch["input_ids"].shape == (2, 256)
    assert batch["attention_mask"][1].sum() == 3  # [CLS] hi [SEP]


def test_embed_is_differentiable_mean_pool(encoder):
    texts = ["gradients must flow", "through the pooled embedding"]
    batch = encoder.tokenize(texts)
    assert all(v.device == encoder.device for v in batch.values())
    emb = encoder.embed(batch)
    assert emb.requires_grad and emb.shape == (2, 384)
    emb.pow(2).sum().backward()
    grad = encoder.model.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    encoder.model.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.normalize(emb.detach(), dim=1),
                                   encoder.encode(texts), atol=1e-5, rtol=0)


def _copy_dir(src, dst, pooling=None, modules=None, max_seq_length=None):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "README.md", "data_config.json"))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    if pooling is not None:
        (dst / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if modules is not None:
        (dst / "modules.json").write_text(json.dumps(modules))
    if max_seq_length is not None:
        (dst / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    return dst


def test_custom_directory_cls_pooling_no_normalize(minilm_dir, tmp_path):
    """A path: CLS pooling, no Normalize module, a shorter max_seq_length, all read from the files."""
    from sentence_transformers import SentenceTransformer

    modules = json.loads((minilm_dir / "modules.json").read_text())[:2]
    d = _copy_dir(minilm_dir, tmp_path / "cls_model", modules=modules, max_seq_length=16,
                  pooling={"word_embedding_dimension": 384, "pooling_mode_cls_token": True,
                           "pooling_mode_mean_tokens": False})
    enc = SentenceEncoder(d)
    assert enc.pooling.modes == ("cls",) and not enc.pooling.normalize and enc.max_length == 16
    texts = TEXTS["short"] + TEXTS["long_over_max_length"]
    ref = torch.from_numpy(SentenceTransformer(str(d), device="cpu").encode(texts))
    torch.testing.assert_close(enc.encode(texts, normalize=None), ref, atol=1e-5, rtol=0)
    assert enc.tokenize(texts)["input_ids"].shape[1] == 16


def test_custom_directory_mean_and_max_concatenated(minilm_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    d = _copy_dir(minilm_dir, tmp_path / "meanmax", pooling={
        "word_embedding_dimension": 384, "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True})
    enc = SentenceEncoder(d)
    assert enc.pooling.modes == ("max", "mean") and enc.dim == 768
    texts = TEXTS["unicode"]
    ref = torch.from_numpy(SentenceTransformer(str(d), device="cpu").encode(texts))
    torch.testing.assert_close(enc.encode(texts), ref, atol=1e-5, rtol=0)


def test_plain_transformers_dir_defaults_to_mean(minilm_dir, tmp_path, encoder):
    d = tmp_path / "plain"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_dir / f, d / f)
    (d / "model.safetensors").symlink_to(minilm_dir / "model.safetensors")
    enc = SentenceEncoder(d, max_length=256)
    assert enc.pooling.modes == ("mean",) and not enc.pooling.normalize
    torch.testing.assert_close(enc.encode(TEXTS["short"]), encoder.encode(TEXTS["short"]), atol=1e-6, rtol=0)


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        SentenceEncoder(tmp_path / "nope")


def test_not_a_model_directory_names_what_is_missing(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(InputError, match=r"no config\.json"):
        SentenceEncoder(tmp_path)


def test_directory_without_weights_is_refused(minilm_dir, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(minilm_dir / "config.json", d / "config.json")
    with pytest.raises(InputError, match="no weights"):
        SentenceEncoder(d)


def test_unsupported_pooling_is_refused(minilm_dir, tmp_path):
    d = _copy_dir(minilm_dir, tmp_path / "weighted", pooling={
        "word_embedding_dimension": 384, "pooling_mode_weightedmean_tokens": True})
    with pytest.raises(InputError, match="weightedmean"):
        SentenceEncoder(d)


@pytest.mark.parametrize("bad", [["ok", 3], [None]], ids=["int_item", "none_item"])
def test_non_string_texts_are_refused(encoder, bad):
    with pytest.raises(InputError, match="must be strings"):
        encoder.encode(bad)


@pytest.mark.cuda
def test_cuda_matches_cpu(encoder):
    gpu = SentenceEncoder(device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    texts = TEXTS["short"] + TEXTS["unicode"]
    out = gpu.encode(texts)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, encoder.encode(texts), atol=1e-4, rtol=0)


def test_encode_runs_in_eval_and_restores_training_flag(encoder):
    texts = TEXTS["short"]
    ref = encoder.encode(texts)
    encoder.model.train()  # as a trainer leaves it: dropout on
    try:
        torch.testing.assert_close(encoder.encode(texts), ref, atol=0, rtol=0)
        assert encoder.model.training
    finally:
        encoder.model.eval()
