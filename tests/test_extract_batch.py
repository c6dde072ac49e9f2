"""`aios-fast extract-batch`: many (base, tuned) safetensors pairs into cards, resumable, on a
local process pool and on Ray (a local instance, 2 CPUs) with bit-identical cards; the same
for a factory training job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aios_fast.cli import main
from aios_fast.errors import InputError

SHAPES = {"layers.0.proj": (48, 32), "layers.1.proj": (32, 48), "head.dense": (16, 32)}


def _pairs(root: Path, n: int, rank: int = 3) -> list[dict]:
    """n tuned checkpoints of one base, each tuned by a known rank-``rank`` delta."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {k + ".weight": torch.randn(*s, generator=g) for k, s in SHAPES.items()}
    root.mkdir(parents=True, exist_ok=True)
    save_file(base, str(root / "base.safetensors"))
    jobs, deltas = [], {}
    for i in range(n):
        tuned = {}
        for k, s in SHAPES.items():
            d = 0.1 * torch.randn(s[0], rank, generator=g) @ torch.randn(rank, s[1], generator=g)
            tuned[k + ".weight"] = base[k + ".weight"] + d
            deltas[(f"pair{i}", k)] = d
        save_file(tuned, str(root / f"tuned{i}.safetensors"))
        jobs.append({"name": f"pair{i}", "tuned": f"tuned{i}.safetensors", "out": f"cards/pair{i}.lora.arrow"})
    return jobs, deltas


def _write(root: Path, jobs: list[dict], name="jobs.json", **defaults) -> Path:
    p = root / name
    p.write_text(json.dumps({"defaults": {"base": "base.safetensors", "rank": 4, **defaults}, "jobs": jobs}))
    return p


def test_extract_batch_cli_resumes_and_verifies(tmp_path, capsys):
    from aios_fast.cards import LoRAFormat

    jobs, deltas = _pairs(tmp_path, 3)
    jobs_file = _write(tmp_path, jobs)
    assert main(["extract-batch", str(jobs_file), "--executor", "inline", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 0)
    for j in summary["jobs"]:
        card = LoRAFormat.load(j["card"])
        assert j["modules"] == 3 and j["energy_fraction"] == pytest.approx(1.0, abs=1e-6)
        for k in SHAPES:                                       # rank 4 >= true rank 3: exact
            assert torch.allclose(card.delta(k), deltas[(j["job_id"], k)], atol=1e-4)
    # rerun: every output verified and skipped; a damaged card and a changed spec run again
    first = {j["job_id"]: j["sha256"] for j in summary["jobs"]}
    damaged = tmp_path / "cards" / "pair1.lora.arrow"
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    damaged.write_bytes(bytes(raw))
    jobs[2]["rank"] = 2
    _write(tmp_path, jobs)
    assert main(["extract-batch", str(jobs_file), "--executor", "inline", "--json",
                 "--summary", str(tmp_path / "s.json")]) == 0
    again = json.loads(capsys.readouterr().out)
    status = {j["job_id"]: j["status"] for j in again["jobs"]}
    assert status == {"pair0": "skipped", "pair1": "done", "pair2": "done"}
    assert again["jobs"][1]["sha256"] == first["pair1"]        # same spec, same seed: same bytes
    assert again["jobs"][2]["modules"] == 3 and json.loads((tmp_path / "s.json").read_text()) == again
    # the table form, and a failing job reported while the others finish
    jobs.append({"name": "broken", "tuned": "missing.safetensors", "out": "cards/broken.lora.arrow"})
    _write(tmp_path, jobs)
    assert main(["extract-batch", str(jobs_file), "--executor", "inline", "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "0 done, 3 skipped, 1 failed" in out and "broken" in out and "does not exist" in out


@pytest.mark.parametrize("bad, match", [
    ({"jobs": []}, "non-empty list"),
    ({"jobs": [{"name": "a", "tuned": "t"}]}, "missing required field 'base'"),
    ({"jobs": [{"name": "a", "base": "b", "tuned": "t", "out": "o", "rank": 0}]}, "rank must be an int >= 1"),
    ({"jobs": [{"name": "a", "base": "b", "tuned": "t", "out": "o", "colour": 1}]}, r"unknown field\(s\) \['colour'\]"),
    ({"jobs": [{"name": "a", "base": "b", "tuned": "t", "out": "o"}] * 2}, "duplicate job id 'a'"),
    ({"job": []}, r"unknown top-level key\(s\) \['job'\]"),
], ids=["empty", "missing-base", "bad-rank", "unknown-field", "duplicate", "top-level"])
def test_jobs_file_errors_name_the_problem(tmp_path, bad, match):
    from aios_fast.factory.batch import load_jobs

    p = tmp_path / "jobs.json"
    p.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=match):
        load_jobs(p)


def test_yaml_jobs_file(tmp_path):
    yaml = pytest.importorskip("yaml", reason="YAML jobs files need PyYAML")
    from aios_fast.factory.batch import load_jobs

    jobs, _ = _pairs(tmp_path, 2)
    p = tmp_path / "jobs.yaml"
    p.write_text(yaml.safe_dump({"defaults": {"base": "base.safetensors", "energy": 0.9}, "jobs": jobs}))
    loaded = load_jobs(p)
    assert [j.job_id for j in loaded] == ["pair0", "pair1"] and all(j.energy == 0.9 for j in loaded)
    assert all(Path(j.base).is_absolute() and Path(j.base).exists() for j in loaded)


def _train_job(out: Path) -> dict:
    from aios_fast.bundled import minilm_dir
    from aios_fast.factory.jobs import TrainJob

    from _factory_data import DATA, records

    recs = [[r["query"], r["answer"]] for r in records(DATA / "payroll.jsonl")]
    return TrainJob(job_id="payroll_v1", engine={"kind": "encoder", "path": str(minilm_dir())}, name="payroll",
                    train=recs[:16], heldout=recs[40:], guard=["The capital of France is Paris."], out=str(out),
                    rank=4, alpha=8, epochs=1, batch_size=8, seed=3).to_dict()


@pytest.mark.slow
def test_local_pool_and_ray_give_identical_cards(tmp_path):
    try:
        import ray  # noqa: F401
    except ImportError:
        pytest.skip("ray is not importable: pip install 'aios-fast[ray]' to run the Ray executor test")
    from aios_fast.factory.batch import load_jobs, run_batch
    from aios_fast.factory.executors import LocalExecutor, RayExecutor

    jobs, _ = _pairs(tmp_path / "ckpt", 4)
    results = {}
    for kind in ("local", "ray"):
        for j in jobs:
            j["out"] = f"../{kind}/{j['name']}.lora.arrow"
        batch = load_jobs(_write(tmp_path / "ckpt", jobs, name=f"{kind}.json"))
        ex = LocalExecutor(workers=2) if kind == "local" else RayExecutor(num_cpus_total=2)
        try:
            rep = run_batch(batch, ex)
            train = ex.map([_train_job(tmp_path / kind / "payroll_v1.lora.arrow")])[0]
        finally:
            ex.close()
        assert not rep.failed, rep.failed
        results[kind] = {j["job_id"]: j["sha256"] for j in rep.jobs} | {"train": train["sha256"]}
        pids = {j["pid"] for j in rep.jobs}
        assert all(p != __import__("os").getpid() for p in pids)        # really ran elsewhere
    assert results["local"] == results["ray"]
    for name in ("pair0", "pair3", "payroll_v1"):
        assert (tmp_path / "local" / f"{name}.lora.arrow").read_bytes() == \
            (tmp_path / "ray" / f"{name}.lora.arrow").read_bytes()
