"""Whole-model extraction: `aios-fast extract` against `mergekit-extract-lora`, same pair, same rank.

The pair is SmolLM2-135M-sized (Llama, hidden 576, MLP 1536, 30 layers, 9/3 heads, vocab
49152; random weights — timing does not depend on the values) saved as bfloat16 safetensors
transformers directories; the tuned copy adds a rank-8 delta plus noise to every linear
weight. Both tools run as subprocesses on the same directories at rank 16, on the CPU,
excluding embeddings/lm_head, one round each (mergekit's full SVD per module is the slow part
we compare against). mergekit lives in its own virtual environment so it cannot disturb this
one's packages:

    python -m venv .venv-mergekit
    .venv-mergekit/bin/pip install torch==2.13.0 mergekit

The benchmark skips with that reason when ``.venv-mergekit/bin/mergekit-extract-lora`` is absent
(or ``MERGEKIT_EXTRACT_LORA`` points elsewhere). Both outputs are checked: same modules, and
the reconstructed deltas agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MERGEKIT = Path(os.environ.get("MERGEKIT_EXTRACT_LORA", ROOT / ".venv-mergekit" / "bin" / "mergekit-extract-lora"))
RANK = 16
TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("pair")
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(d / "base")
    g = torch.Generator().manual_seed(1)
    planted = {}
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                out_f, in_f = mod.weight.shape
                delta = 0.02 * torch.randn(out_f, 8, generator=g) @ torch.randn(8, in_f, generator=g) / 8 ** 0.5
                delta += 1e-4 * torch.randn(out_f, in_f, generator=g)
                mod.weight += delta.to(torch.bfloat16)
                planted[name] = delta
    model.save_pretrained(d / "tuned")
    return d, planted


def _run(cmd, env=None):
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t
    assert proc.returncode == 0, f"{cmd[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return dt


def test_aios_fast_extract(benchmark, pair):
    d, planted = pair
    out = d / "ours.lora.arrow"
    cmd = [sys.executable, "-c", "import sys; from aios_fast.cli import main; sys.exit(main())", "extract", "--base", str(d / "base"), "--tuned", str(d / "tuned"),
           "--rank", str(RANK), "--out", str(out), "--summary", str(d / "ours.json"), "--no-progress"]
    benchmark.group = "whole-model extraction, SmolLM2-135M-sized, rank 16"
    benchmark.pedantic(lambda: TIMES.__setitem__("ours", _run(cmd)), rounds=1, iterations=1)
    from aios_fast.cards import LoRAFormat

    card = LoRAFormat.load(out)
    assert len(card.modules) == len(planted) == 210
    for key in list(planted)[:12]:
        ref = planted[key]
        err = float(torch.linalg.norm(card.delta(key) - ref) / torch.linalg.norm(ref))
        assert err < 0.05, f"{key}: relative error {err:.3f} against the planted delta"
    benchmark.extra_info.update({"seconds": TIMES["ours"], "modules": len(card.modules),
                                 "summary": json.loads((d / "ours.json").read_text())["seconds"]})


def test_mergekit_extract_lora(benchmark, pair):
    if not MERGEKIT.exists():
        pytest.skip(f"mergekit not installed at {MERGEKIT}: python -m venv .venv-mergekit && "
                    f".venv-mergekit/bin/pip install torch==2.13.0 mergekit")
    d, planted = pair
    out = d / "mergekit"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(MERGEKIT), "--model", str(d / "tuned"), "--base-model", str(d / "base"), "--out-path", str(out),
           "--max-rank", str(RANK), "--no-copy-tokenizer", "--quiet", "-e", "embed_tokens", "-e", "lm_head"]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["HF_HUB_OFFLINE"] = "1"
    benchmark.group = "whole-model extraction, SmolLM2-135M-sized, rank 16"
    benchmark.pedantic(lambda: TIMES.__setitem__("mergekit", _run(cmd, env)), rounds=1, iterations=1)
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, f"mergekit wrote no adapter in {out}: {list(out.iterdir())}"
    sd = {}
    for f in files:
        sd.update(load_file(f))
    cfg = json.loads((out / "adapter_config.json").read_text())
    key = next(iter(planted))
    a = next(v for k, v in sd.items() if key in k and "lora_A" in k).float()
    b = next(v for k, v in sd.items() if key in k and "lora_B" in k).float()
    scale = cfg.get("lora_alpha", RANK) / cfg.get("r", RANK)
    err = float(torch.linalg.norm(scale * b @ a - planted[key]) / torch.linalg.norm(planted[key]))
    assert err < 0.05, f"mergekit {key}: relative error {err:.3f}"
    ratio = TIMES["mergekit"] / TIMES["ours"] if "ours" in TIMES else None
    benchmark.extra_info.update({"seconds": TIMES["mergekit"], "speedup_ours_vs_mergekit": ratio})
    print(f"\nmergekit {TIMES['mergekit']:.1f} s, aios-fast {TIMES.get('ours', float('nan')):.1f} s, "
          f"speed-up {ratio if ratio else float('nan'):.1f}x")
