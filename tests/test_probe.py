"""WeightMapProbe and HeatMap on the real bundled MiniLM: hooks change nothing, statistics are
right (padding excluded), different tasks light up different modules, hooks always come off,
bad inputs are refused, Parquet round trip is exact, the PNG is a real picture."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from aios_fast.errors import InputError
from aios_fast.probe import HeatMap, WeightMapProbe, corpus, split_name


class Engine:
    """The engine contract the probe needs: ``.model`` and ``.tokenize(texts)``."""

    def __init__(self, model, tokenizer, device="cpu"):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def tokenize(self, texts):
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}


@pytest.fixture(scope="module")
def engine(hf_minilm, minilm_tokenizer):
    return Engine(hf_minilm, minilm_tokenizer)


@pytest.fixture(scope="module")
def heatmaps(engine):
    """Code and cooking corpora, each against the general baseline (computed once)."""
    p = WeightMapProbe(engine)
    base = corpus("general")[:24]
    return {task: p.probe(corpus(task)[:24], base, batch_size=8) for task in ("code", "cooking")}


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_default_selection_is_every_linear(hf_minilm):
    p = WeightMapProbe(hf_minilm)
    linears = [n for n, m in hf_minilm.named_modules() if isinstance(m, nn.Linear)]
    assert p.module_names == linears and len(linears) == 37  # 6 layers x 6 + pooler


def test_hooks_leave_outputs_bit_identical(engine):
    batch = engine.tokenize(corpus("code")[:6] + ["short", "a much longer sentence " * 5])
    with torch.no_grad():
        plain = engine.model(**batch)
        with WeightMapProbe(engine) as p:
            hooked = engine.model(**batch)
            assert p.attached and p._states  # the hooks did run
    assert torch.equal(plain.last_hidden_state, hooked.last_hidden_state)
    assert torch.equal(plain.pooler_output, hooked.pooler_output)
    assert no_hooks(engine.model)


def test_statistics_match_captured_outputs_and_ignore_padding(engine):
    texts = corpus("cooking")[:5] + ["Hi.", "Stir."]
    name = "encoder.layer.2.intermediate.dense"
    captured = []
    mod = dict(engine.model.named_modules())[name]
    h = mod.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    try:
        hm = WeightMapProbe(engine, modules=[name, "pooler.dense"]).probe(texts, batch_size=7)
    finally:
        h.remove()
    batch = engine.tokenize(texts)
    mask = batch["attention_mask"].bool()
    assert not mask.all(), "the batch must contain padding for this test to mean anything"
    real = captured[0][mask].double()  # (real tokens, 1536)
    norms = real.norm(dim=1)
    s = hm.stats[name]
    assert s["count"] == mask.sum().item()
    assert s["mean_norm"] == pytest.approx(norms.mean().item(), rel=1e-5)
    assert s["max"] == pytest.approx(norms.max().item(), rel=1e-5)
    assert s["raw_l2"] == pytest.approx(real.norm().item(), rel=1e-5)
    np.testing.assert_allclose(hm.channel_energy[name], (real * real).sum(0).numpy(), rtol=1e-4)
    # the pooler output is (batch, features): every row counts
    assert hm.stats["pooler.dense"]["count"] == len(texts)


def test_padding_does_not_change_statistics(engine):
    texts = corpus("code")[:6]
    p = WeightMapProbe(engine, modules=r"layer\.[03]\.")
    one = p.probe(texts, batch_size=1)  # no padding at all
    padded = p.probe(texts, batch_size=6)  # padded to the longest text
    for m in one.modules:
        assert one.stats[m]["count"] == padded.stats[m]["count"]
        assert one.stats[m]["mean_norm"] == pytest.approx(padded.stats[m]["mean_norm"], rel=1e-4)


def test_raw_l2_equals_seed_style_accumulated_norm(engine):
    """The seed scored torch.norm(out) per call; over a run that is sqrt(sum of squares)."""
    texts = corpus("general")[:4]
    name = "encoder.layer.1.attention.self.value"
    seed = []
    mod = dict(engine.model.named_modules())[name]
    h = mod.register_forward_hook(lambda m, i, o: seed.append(torch.norm(o).item() ** 2))
    try:
        hm = WeightMapProbe(engine, modules=[name]).probe(texts, batch_size=1)  # no padding: seed saw the same
    finally:
        h.remove()
    assert hm.scores("raw_l2")[name] == pytest.approx(math.sqrt(sum(seed)), rel=1e-5)


def test_different_tasks_give_different_hot_zones(heatmaps):
    code, cook = heatmaps["code"], heatmaps["cooking"]
    top_code = [m for m, _ in code.hot_zones(10)]
    top_cook = [m for m, _ in cook.hot_zones(10)]
    assert top_code != top_cook
    assert set(top_code[:5]) != set(top_cook[:5])
    a, b = code.scores("contrast"), cook.scores("contrast")
    # scores differ substantially, not just by float noise
    assert max(abs(a[m] - b[m]) for m in a) > 0.05
    assert code.hot_zones(3)[0][1] > 0 and cook.hot_zones(3)[0][1] > 0  # something lights up more than baseline


def test_scores_and_hot_zones(heatmaps):
    hm = heatmaps["code"]
    assert hm.default_score() == "contrast"
    zones = hm.hot_zones(5, "mean_norm")
    assert len(zones) == 5 and [v for _, v in zones] == sorted((v for _, v in zones), reverse=True)
    # mean_norm rankings are dominated by the wide MLP up-projections; contrast cancels module scale
    assert all("intermediate" in m for m, _ in zones[:3])
    for m in hm.modules:
        t, b = hm.stats[m]["mean_norm"], hm.baseline[m]["mean_norm"]
        assert hm.scores("contrast")[m] == pytest.approx(math.log(t / b))
    assert set(hm.scores("effect_size")) == set(hm.modules)
    with pytest.raises(InputError, match="unknown score 'loud'"):
        hm.scores("loud")
    with pytest.raises(InputError, match="top_k must be >= 1"):
        hm.hot_zones(0)


def test_contrast_without_baseline_is_refused(engine, tmp_path):
    hm = WeightMapProbe(engine, modules=r"layer\.0\.attention\.self").probe(["one text"])
    assert hm.default_score() == "mean_norm"
    with pytest.raises(InputError, match="needs baseline inputs"):
        hm.scores("contrast")
    back = HeatMap.load(hm.save(tmp_path / "h.parquet"))
    assert back.baseline is None and back.stats == hm.stats


def test_detach_leaves_no_hooks_also_after_exception(engine):
    model = engine.model
    with pytest.raises(RuntimeError, match="boom"):
        with WeightMapProbe(engine) as p:
            assert not no_hooks(model)
            raise RuntimeError("boom")
    assert not p.attached and no_hooks(model)
    p.attach()
    p.attach()  # idempotent: still one hook per module
    assert sum(len(m._forward_hooks) for m in model.modules()) == len(p.module_names)
    p.detach()
    p.detach()
    assert no_hooks(model)


def test_hooks_work_under_inference_mode_grad_and_plain_calls():
    """States made inside inference_mode must still accept updates outside it (and vice versa)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8)).eval()
    for impl in ("cpp", "torch"):
        with WeightMapProbe(model, impl=impl) as p:
            with torch.inference_mode():
                model(torch.randn(3, 4))
            model(torch.randn(2, 4))
            model(torch.randn(5, 4, requires_grad=True)).sum().backward()
            assert p.statistics()["0"]["count"] == 10
    assert no_hooks(model)


def test_probe_detaches_after_a_failing_forward(engine):
    p = WeightMapProbe(engine)
    with pytest.raises(Exception):
        p.probe([{"input_ids": torch.tensor([[101, 999999, 102]])}])  # id out of the vocabulary
    assert no_hooks(engine.model)
    with pytest.raises(InputError, match="empty corpus"):
        p.probe([])
    assert no_hooks(engine.model)


def test_bad_module_filters_list_what_exists(hf_minilm):
    with pytest.raises(InputError, match=r"matches none.*some available: \['encoder\.layer\.0"):
        WeightMapProbe(hf_minilm, modules=r"decoder\.")
    with pytest.raises(InputError, match=r"\['encoder\.layer\.9\.query'\] match no candidate.*Linear modules"):
        WeightMapProbe(hf_minilm, modules=["encoder.layer.0.attention.self.query", "encoder.layer.9.query"])
    with pytest.raises(InputError, match="no modules of type Conv2d"):
        WeightMapProbe(hf_minilm, types=(nn.Conv2d,))
    with pytest.raises(InputError, match="not a valid regular expression"):
        WeightMapProbe(hf_minilm, modules="([")
    with pytest.raises(InputError, match="nn.Module or an engine"):
        WeightMapProbe(object())


def test_texts_need_an_engine(hf_minilm):
    with pytest.raises(InputError, match="texts need an engine"):
        WeightMapProbe(hf_minilm).probe(["some text"])
    assert no_hooks(hf_minilm)


def test_plain_module_with_tensor_batches_and_bar_chart(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 33), nn.ReLU(), nn.Linear(33, 7)).eval()
    batches = [torch.randn(4, 5, 10), torch.randn(3, 10)]
    hm = WeightMapProbe(model).probe(batches)
    assert hm.modules == ["0", "2"]
    assert hm.stats["0"]["count"] == 4 * 5 + 3
    with torch.no_grad():
        out = torch.cat([model[0](b).reshape(-1, 33) for b in batches]).double()
    assert hm.stats["0"]["mean_norm"] == pytest.approx(out.norm(dim=1).mean().item(), rel=1e-5)
    model.train()
    WeightMapProbe(model).probe(batches)
    assert model.training  # probe runs in eval mode and restores the mode afterwards
    png = hm.to_png(tmp_path / "bars.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parquet_round_trip_is_exact(heatmaps, tmp_path):
    hm = heatmaps["code"]
    path = hm.save(tmp_path / "sub" / "heatmap.parquet")
    back = HeatMap.load(path)
    assert back.modules == hm.modules
    assert back.stats == hm.stats and back.baseline == hm.baseline
    for m in hm.modules:
        assert back.channel_energy[m].dtype == np.float32
        assert np.array_equal(back.channel_energy[m], hm.channel_energy[m])
        assert np.array_equal(back.baseline_channel_energy[m], hm.baseline_channel_energy[m])
    assert back.hot_zones(10) == hm.hot_zones(10)
    assert back.metadata == hm.metadata
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    assert str(schema.field("channel_energy").type) == "list<element: float>"
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["heatmap.parquet"]  # no temp left


def test_loading_a_foreign_parquet_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2]}), tmp_path / "other.parquet")
    with pytest.raises(InputError, match="aios_heatmap_version"):
        HeatMap.load(tmp_path / "other.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet heat map"):
        HeatMap.load(tmp_path / "junk.parquet")


def test_png_is_a_real_grid_picture(heatmaps, tmp_path):
    import matplotlib.image as mpimg

    path = heatmaps["cooking"].to_png(tmp_path / "heatmap.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    img = mpimg.imread(path)
    assert img.shape[0] > 300 and img.shape[1] > 500
    colours = np.unique((img[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 100  # a colour-mapped grid, not a blank canvas


def test_split_name():
    assert split_name("encoder.layer.3.attention.self.query") == (3, "attention.self.query")
    assert split_name("model.layers.11.mlp.down_proj") == (11, "mlp.down_proj")
    assert split_name("pooler.dense") == (None, "pooler.dense")
    assert split_name("0") == (None, "0")


def test_cli_default_run_writes_heatmap(tmp_path, capsys):
    """The README's main job: `aios-fast probe --top 10` offline on the bundled MiniLM."""
    from aios_fast.cli import main

    out = tmp_path / "out"
    assert main(["probe", "--top", "10", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["score"] == "contrast" and len(report["hot_zones"]) == 10
    assert report["task_texts"] == len(corpus("code")) and report["baseline_texts"] == len(corpus("general"))
    hm = HeatMap.load(out / "heatmap.parquet")
    assert [z["module"] for z in report["hot_zones"]] == [m for m, _ in hm.hot_zones(10)]
    assert (out / "heatmap.png").stat().st_size > 20_000


def test_cli_texts_file_and_errors(tmp_path, capsys):
    from aios_fast.cli import main

    f = tmp_path / "task.txt"
    f.write_text("Knead the dough.\n\nProof the yeast.\n")
    assert main(["probe", "Whisk the eggs.", "--file", str(f), "--no-baseline", "--modules", r"layer\.5\.",
                 "--top", "3", "--out", str(tmp_path / "o"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["score"] == "mean_norm" and report["task_texts"] == 3
    assert all(".layer.5." in z["module"] for z in report["hot_zones"])
    with pytest.raises(SystemExit) as exc:  # argparse refuses it, naming the argument
        main(["probe", "--file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "argument --file: no such file" in capsys.readouterr().err
    assert main(["probe", "x", "--modules", "nothing-here", "--out", str(tmp_path / "o")]) == 1
    assert "some available" in capsys.readouterr().err


@pytest.mark.cuda
def test_probe_on_cuda_matches_cpu(hf_minilm, minilm_tokenizer):
    import copy

    gpu = Engine(copy.deepcopy(hf_minilm).cuda(), minilm_tokenizer, "cuda")
    cpu = Engine(hf_minilm, minilm_tokenizer)
    texts = corpus("code")[:8]
    a = WeightMapProbe(cpu).probe(texts, batch_size=4)
    b = WeightMapProbe(gpu).probe(texts, batch_size=4)
    for m in a.modules:
        assert a.stats[m]["count"] == b.stats[m]["count"]
        assert b.stats[m]["mean_norm"] == pytest.approx(a.stats[m]["mean_norm"], rel=1e-3)
    assert no_hooks(gpu.model)
