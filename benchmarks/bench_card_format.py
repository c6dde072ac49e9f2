"""Card format costs, each beside a peer in the same run: the v2 checksum (SHA-256, chosen)
against BLAKE2b; a verified load against an unverified one; an atomic v2 save against
safetensors' save_file followed by the same fsync. The card is rank 16 on every linear layer
of the bundled MiniLM (37 modules, 2.7 MB). Each benchmark also checks its result.

    python -m pytest benchmarks/bench_card_format.py --benchmark-only -q
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from aios_fast.cards import LoRACard, LoRAFormat, spec


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    from transformers import AutoConfig

    from aios_fast.bundled import minilm_dir

    cfg = AutoConfig.from_pretrained(minilm_dir())
    h, i = cfg.hidden_size, cfg.intermediate_size
    shapes = {"attention.self.query": (h, h), "attention.self.key": (h, h),
              "attention.self.value": (h, h), "attention.output.dense": (h, h),
              "intermediate.dense": (i, h), "output.dense": (h, i)}
    g = torch.Generator().manual_seed(0)
    A, B = {}, {}
    for layer in range(cfg.num_hidden_layers):
        for sub, (o, n) in shapes.items():
            k = f"encoder.layer.{layer}.{sub}"
            A[k], B[k] = torch.randn(16, n, generator=g), torch.randn(o, 16, generator=g)
    A["pooler.dense"], B["pooler.dense"] = torch.randn(16, h, generator=g), torch.randn(h, 16, generator=g)
    return LoRACard("bench", 16, 32.0, sorted(A), A, B)


@pytest.fixture(scope="module")
def path(card, tmp_path_factory):
    return LoRAFormat.save(card, tmp_path_factory.mktemp("cards") / "bench.lora.arrow")


def _tensor_bytes(card):
    return [memoryview(t.numpy()).cast("B") for k in card.modules
            for t in (card.weights_A[k], card.weights_B[k])]


@pytest.mark.benchmark(group="card-checksum")
@pytest.mark.parametrize("algo", ["sha256", "blake2b"])
def test_checksum_algorithms(benchmark, card, algo):
    parts = _tensor_bytes(card)

    def run():
        h = hashlib.new(algo)
        for p in parts:
            h.update(p)
        return h.hexdigest()

    assert run() == benchmark(run)


@pytest.mark.benchmark(group="card-load")
@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_load_verify_cost(benchmark, card, path, verify):
    loaded = benchmark(LoRAFormat.load, path, verify=verify)
    assert loaded.equal(card)


@pytest.mark.benchmark(group="card-save")
def test_save_lora_arrow(benchmark, card, tmp_path):
    out = benchmark(LoRAFormat.save, card, tmp_path / "s.lora.arrow")
    assert LoRAFormat.inspect(out)["checksum"] == "ok"


@pytest.mark.benchmark(group="card-save")
def test_save_safetensors_with_fsync(benchmark, card, tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {f"{k}.lora_{s}": t for k in card.modules
               for s, t in (("A", card.weights_A[k]), ("B", card.weights_B[k]))}
    out = tmp_path / "s.safetensors"

    def run():
        save_file(tensors, out)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    benchmark(run)
    assert torch.equal(load_file(out)["pooler.dense.lora_A"], card.weights_A["pooler.dense"])


def test_checksum_definition_matches_spec(card, path):
    """The stored checksum is spec.checksum over the rows (the benchmarks time its core)."""
    info = LoRAFormat.inspect(path)
    assert info["checksum_value"].startswith(spec.CHECKSUM_ALGO + ":") and info["checksum"] == "ok"
