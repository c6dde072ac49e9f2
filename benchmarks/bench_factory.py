"""Skill factory costs, each beside a peer measured in the same run.

1. Domain clustering (``DomainClusterer.labels``: PCA to 16 dims, scikit-learn HDBSCAN on at
   most 10k rows, core-distance assignment of the rest) on 10k and 100k rows of 384-d unit
   vectors (a mixture of 20 topics plus 5 % uniform noise, shaped like sentence embeddings),
   beside plain ``sklearn.cluster.HDBSCAN()`` with its defaults on the raw 384-d rows; the
   agreement between the two is the adjusted Rand index (ARI). The peer is quadratic in the
   rows and linear in the dimension: at 100k it would run for hours on 2 cores, so it runs on
   a 10k subsample of the 100k rows and the ARI is computed on those rows (printed as such).
   Goal: 100k in under 60 s on 2 cores.
2. Batch extraction of 8 (base, tuned) pairs (6 modules of 1024 × 2048, rank-16 deltas plus
   noise, extracted at rank 32) on a local process pool with 1 and 2 workers and on a local Ray
   instance with 2 CPUs (the overhead Ray adds on one machine).

    python -m pytest benchmarks/bench_factory.py --benchmark-only -q -s
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

N_TOPICS = 20


def _mixture(n: int, seed: int = 0, d: int = 384) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_TOPICS, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = rng.integers(0, N_TOPICS, n)
    X = centres[y] + 0.12 * rng.standard_normal((n, d))
    noise = rng.random(n) < 0.05
    X[noise] = rng.standard_normal((int(noise.sum()), d))
    y[noise] = -1
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


def _ari(a, b) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


RESULTS: dict[str, dict] = {}


@pytest.mark.benchmark(group="factory-cluster")
@pytest.mark.parametrize("n", [10_000, 100_000], ids=["10k", "100k"])
def test_domain_clusterer(benchmark, n):
    from aios_fast.factory.domains import DomainClusterer

    X, y = _mixture(n)
    labels = benchmark.pedantic(lambda: DomainClusterer(dims=16).labels(X), rounds=1, iterations=1)
    ari = _ari(y, labels)
    RESULTS[f"ours-{n}"] = {"labels": labels, "seconds": benchmark.stats.stats.median}
    print(f"\nDomainClusterer {n} x 384: {benchmark.stats.stats.median:.1f} s, {labels.max() + 1} clusters, "
          f"{(labels < 0).mean():.1%} outliers, ARI vs truth {ari:.3f}")
    assert ari > 0.9


@pytest.mark.benchmark(group="factory-cluster")
@pytest.mark.parametrize("n", [10_000, 100_000], ids=["10k", "100k-subsample-10k"])
def test_sklearn_hdbscan_defaults(benchmark, n):
    from sklearn.cluster import HDBSCAN

    X, y = _mixture(n)
    rows = np.arange(n) if n <= 10_000 else np.sort(np.random.default_rng(1).choice(n, 10_000, replace=False))
    labels = benchmark.pedantic(lambda: HDBSCAN(copy=True).fit(X[rows]).labels_, rounds=1, iterations=1)
    ours = RESULTS.get(f"ours-{n}")
    agree = _ari(ours["labels"][rows], labels) if ours else float("nan")
    where = "" if n <= 10_000 else f" (peer on a 10k subsample of the {n} rows; ARI on those rows)"
    print(f"\nsklearn HDBSCAN() defaults, 384-d{where}: {benchmark.stats.stats.median:.1f} s, "
          f"{labels.max() + 1} clusters, {(labels < 0).mean():.1%} outliers, ARI vs truth {_ari(y[rows], labels):.3f}, "
          f"ARI vs DomainClusterer {agree:.3f}"
          + (f", DomainClusterer / peer time {ours['seconds'] / benchmark.stats.stats.median:.2f}x" if ours else ""))
    assert labels.shape == (len(rows),)


# ---------------------------------------------------------------------- batch extraction
@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pairs")
    g = torch.Generator().manual_seed(0)
    shapes = [(2048, 1024), (1024, 2048)] * 3
    base = {f"layer.{i}.w.weight": torch.randn(*s, generator=g) for i, s in enumerate(shapes)}
    save_file(base, str(root / "base.safetensors"))
    jobs = []
    for p in range(8):
        tuned = {k: v + 0.05 * torch.randn(v.shape[0], 16, generator=g) @ torch.randn(16, v.shape[1], generator=g)
                 + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tuned, str(root / f"tuned{p}.safetensors"))
        jobs.append({"name": f"p{p}", "tuned": f"tuned{p}.safetensors", "out": f"out/p{p}.lora.arrow"})
    f = root / "jobs.json"
    f.write_text(json.dumps({"defaults": {"base": "base.safetensors", "rank": 32}, "jobs": jobs}))
    return f


def _executor(kind: str):
    from aios_fast.factory.executors import LocalExecutor, RayExecutor

    if kind == "ray-2cpu":
        pytest.importorskip("ray", reason="the Ray executor needs ray (pip install 'aios-fast[ray]')")
        return RayExecutor(num_cpus_total=2)
    return LocalExecutor(workers=int(kind[-1]))


@pytest.mark.benchmark(group="factory-batch-8-pairs")
@pytest.mark.parametrize("kind", ["local-1", "local-2", "ray-2cpu"])
def test_batch_extraction(benchmark, pairs, kind):
    from aios_fast.factory.batch import load_jobs, run_batch

    jobs = load_jobs(pairs)
    ex = _executor(kind)
    try:
        ex.map([jobs[0].to_dict()])  # start the workers (and Ray) outside the timing
        t0 = time.perf_counter()
        report = benchmark.pedantic(lambda: run_batch(jobs, ex, force=True), rounds=2, iterations=1)
    finally:
        ex.close()
    assert not report.failed and all(j["status"] == "done" for j in report.jobs)
    shas = {j["job_id"]: j["sha256"] for j in report.jobs}
    prev = RESULTS.setdefault("batch-shas", shas)
    assert prev == shas  # every executor writes the same bytes
    print(f"\nextract-batch 8 pairs on {kind}: {benchmark.stats.stats.median:.2f} s per batch "
          f"({time.perf_counter() - t0:.1f} s wall for 2 rounds)")
