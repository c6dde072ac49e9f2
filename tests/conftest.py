"""Shared fixtures: the bundled models (offline), devices, and the CUDA skip rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
CUDA_SKIP_REASON = "needs a CUDA GPU; none is visible on this machine (run on a GPU machine)"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def minilm_dir():
    from aios_fast.bundled import minilm_dir as find

    return find()


@pytest.fixture(scope="session")
def smollm2_gguf():
    from aios_fast.bundled import smollm2_gguf as find

    return find()


@pytest.fixture(scope="session")
def hf_minilm(minilm_dir):
    """The bundled MiniLM as a plain transformers BertModel (eval mode), shared read-only:
    tests that modify it must work on a copy."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def encoder():
    """The bundled MiniLM as a SentenceEncoder, one per test module."""
    from aios_fast import SentenceEncoder

    return SentenceEncoder()


@pytest.fixture(scope="module")
def domain_router(encoder):
    """A LoRARouter on ``encoder`` with one skill per domain of tests/data/routing/domains.json
    (its description and register examples), one per test module: tests may calibrate it."""
    from aios_fast import LoRARouter

    data = json.loads((Path(__file__).parent / "data" / "routing" / "domains.json").read_text())
    r = LoRARouter(encoder)
    for name, d in data["domains"].items():
        r.add_skill(name, d["description"], d["register"])
    return r


# --- teacher servers (real HTTP servers on 127.0.0.1; see tests/servers/) ---------------------
@pytest.fixture()
def fault_server():
    """A scriptable OpenAI-compatible server that answers with faults (servers.fault_server)."""
    from servers.fault_server import FaultServer

    with FaultServer() as srv:
        yield srv


@pytest.fixture(scope="session")
def llama_server():
    """llama-cpp-python's OpenAI-compatible server on the bundled SmolLM2 GGUF, for the session.
    Skipped only when llama_cpp is not importable (CI installs it: .ci/setup)."""
    import importlib.util

    from aios_fast.evolve.llama_server import LlamaServer

    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
    with LlamaServer(n_threads=2) as srv:
        yield srv
