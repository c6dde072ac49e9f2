"""Engines beside their peers, in one run, on the bundled models:

* ``encode``: ``SentenceEncoder.encode`` against ``SentenceTransformer.encode`` (64 sentences).
* ``weights_read`` / ``weights_write``: MiniLM's state dict through ArrowEngine's Parquet layout
  (``ModelConverter``) against ``safetensors.torch`` ``save_file`` and ``load_file`` (lazy mmap, and
  materialised with one copy, which is what ``from_parquet`` returns).
* ``smollm2_load``: ``CausalLM()`` from its dequantised cache against dequantising the GGUF
  (``cache=False``, what transformers' ``gguf_file=`` loader does every time); one round each.

Every benchmark checks its result; the module teardown writes the ratios to
``/tmp/aios-sections/engines_ratios.json``.

Run: ``python -m pytest benchmarks/bench_engines.py --benchmark-only -q --benchmark-json /tmp/aios-sections/engines.json``
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from aios_fast.bundled import minilm_dir  # noqa: E402
from aios_fast.engines import CausalLM, ModelConverter, SentenceEncoder  # noqa: E402

ROUNDS = int(os.environ.get("AIOS_BENCH_ROUNDS", "3"))
RESULTS: dict[str, float] = {}
TEXTS = [f"Sentence {i}: " + "the node learns a new skill from its peers " * (1 + i % 5) for i in range(64)]


def _run(benchmark, key, fn, rounds=ROUNDS):
    result = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    RESULTS[key] = benchmark.stats.stats.median
    return result


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    ratios = {}
    for ours, peer in [("encode_ours", "encode_st"), ("read_parquet", "read_safetensors"),
                       ("read_parquet", "read_safetensors_lazy"),
                       ("write_parquet", "write_safetensors"), ("load_cached", "load_gguf")]:
        if ours in RESULTS and peer in RESULTS:
            ratios[f"{ours}/{peer}"] = RESULTS[ours] / RESULTS[peer]
    out = Path("/tmp/aios-sections")
    out.mkdir(parents=True, exist_ok=True)
    (out / "engines_ratios.json").write_text(json.dumps({"seconds": RESULTS, "ratios": ratios}, indent=2))
    print("\nengines ratios (ours / peer):", json.dumps(ratios, indent=2))


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


@pytest.fixture(scope="module")
def minilm_sd():
    from safetensors.torch import load_file

    return load_file(str(minilm_dir() / "model.safetensors"))


@pytest.mark.benchmark(group="encode")
def test_encode_ours(benchmark, encoder, st_model):
    out = _run(benchmark, "encode_ours", lambda: encoder.encode(TEXTS))
    torch.testing.assert_close(out, torch.from_numpy(st_model.encode(TEXTS)), atol=1e-5, rtol=0)


@pytest.mark.benchmark(group="encode")
def test_encode_sentence_transformers(benchmark, st_model):
    out = _run(benchmark, "encode_st", lambda: st_model.encode(TEXTS, batch_size=32))
    assert out.shape == (64, 384)


@pytest.mark.benchmark(group="weights_write")
def test_write_parquet(benchmark, minilm_sd, tmp_path):
    out = _run(benchmark, "write_parquet", lambda: ModelConverter.to_parquet(minilm_sd, tmp_path / "pq"))
    assert (out / "weights.parquet").stat().st_size > sum(t.nbytes for t in minilm_sd.values())


@pytest.mark.benchmark(group="weights_write")
def test_write_safetensors(benchmark, minilm_sd, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    _run(benchmark, "write_safetensors", lambda: save_file(minilm_sd, str(path)))
    assert path.stat().st_size > sum(t.nbytes for t in minilm_sd.values())


@pytest.mark.benchmark(group="weights_read")
def test_read_parquet(benchmark, minilm_sd, tmp_path):
    d = ModelConverter.to_parquet(minilm_sd, tmp_path / "pq")
    back = _run(benchmark, "read_parquet", lambda: ModelConverter.from_parquet(d))
    assert all(torch.equal(back[k], v) for k, v in minilm_sd.items())


@pytest.mark.benchmark(group="weights_read")
def test_read_safetensors_materialised(benchmark, minilm_sd):
    """The fair peer: safetensors' mmap load plus the one copy that puts every byte in memory,
    which is what ``from_parquet`` hands back (private, writable tensors)."""
    from safetensors.torch import load_file

    path = str(minilm_dir() / "model.safetensors")
    back = _run(benchmark, "read_safetensors", lambda: {k: v.clone() for k, v in load_file(path).items()})
    assert all(torch.equal(back[k], v) for k, v in minilm_sd.items())


@pytest.mark.benchmark(group="weights_read")
def test_read_safetensors_lazy(benchmark, minilm_sd):
    """For reference: load_file alone maps the file and touches almost nothing."""
    from safetensors.torch import load_file

    back = _run(benchmark, "read_safetensors_lazy", lambda: load_file(str(minilm_dir() / "model.safetensors")))
    assert all(torch.equal(back[k], v) for k, v in minilm_sd.items())


@pytest.mark.benchmark(group="smollm2_load")
def test_load_cached(benchmark):
    CausalLM()  # make sure the cache exists before timing it
    lm = _run(benchmark, "load_cached", CausalLM, rounds=1)
    assert lm.cache_dir is not None and (lm.cache_dir / "COMPLETE").is_file()


@pytest.mark.benchmark(group="smollm2_load")
def test_load_gguf(benchmark):
    lm = _run(benchmark, "load_gguf", lambda: CausalLM(cache=False), rounds=1)
    ref = CausalLM().model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in lm.model.state_dict().items())
