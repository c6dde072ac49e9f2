"""Tier 2 distillation: the bundled SmolLM2 as a teacher in process (``LocalTeacher`` on the
transformers engine, and on llama.cpp in process, its default where llama-cpp-python is installed)
against the same GGUF served by llama-cpp-python (``LlamaServer`` + ``OpenAICompatibleProvider``,
the issue's peer), in one run, on the bundled Kestrel demo domain.

Each side distils the same topic (the demo's queries) from the same passages with the same
settings and seed. Reported per side: teacher questions per minute, the share of generated
questions that survive the judge, end-to-end seconds of ``distill_topic`` (ground, pairs, log,
train, gate), whether the gate passed, and the human-written evaluation's recall@1 and MRR@10
before/after (48 questions written by hand, never seen by the teacher or the trainer). The
benchmark timer wraps one full distillation per side (rounds=1: a distillation takes minutes).

    python -m pytest benchmarks/bench_distill.py --benchmark-only -q -s
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")

RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def demo():
    from aios_fast.engines import SentenceEncoder
    from aios_fast.evolve.demo import demo_paths, load_eval, retrieval_eval
    from aios_fast.evolve.retrieval import DocumentIndex

    p = demo_paths()
    enc = SentenceEncoder()
    index = DocumentIndex(enc)
    index.add_folder(p["docs"])
    queries = [l for l in p["queries"].read_text().splitlines() if l.strip() and not l.startswith("#")]
    items = load_eval(p["eval"])
    return {"encoder": enc, "index": index, "queries": queries, "items": items,
            "before": retrieval_eval(enc, index.passages, items)}


def _distil(demo, teacher, tmp_path):
    from aios_fast.evolve.demo import retrieval_eval
    from aios_fast.evolve.distiller import CloudDistiller
    from aios_fast.lora import LoRAManager
    from aios_fast.route.library import SkillLibrary

    lib = SkillLibrary(tmp_path / "lib", encoder=demo["encoder"])
    t0 = time.perf_counter()
    # one held-out split: the cross-fitted gate (the default) would add four trainings to every
    # side and say nothing about the teachers
    res = CloudDistiller(demo["encoder"], lib, index=demo["index"], config={"gate_folds": 1}).distill_topic(
        demo["queries"], teacher, skill_name="kestrel")
    seconds = time.perf_counter() - t0
    rep = res.report
    t = rep["pairs"]["teacher"]
    out = {"seconds": round(seconds, 1), "teacher_seconds": rep["pairs"]["seconds"].get("teacher"),
           "asked": t["asked"], "kept": t["kept"], "survival": t["kept"] / max(1, t["asked"]),
           "questions_per_min": 60 * t["asked"] / max(1e-9, rep["pairs"]["seconds"].get("teacher", 0.0)),
           "passed": res.ok, "reason": rep.get("reason"), "recall@1_before": demo["before"]["recall@1"],
           "mrr@10_before": demo["before"]["mrr@10"]}
    if res.ok:
        with LoRAManager(demo["encoder"].model).applied(res.card):
            after = retrieval_eval(demo["encoder"], demo["index"].passages, demo["items"])
        out.update({"recall@1_after": after["recall@1"], "mrr@10_after": after["mrr@10"]})
    return out


@pytest.mark.benchmark(group="distill")
def test_distill_local_teacher(benchmark, demo, tmp_path):
    from aios_fast.evolve.teachers import LocalTeacher

    teacher = LocalTeacher(backend="transformers")
    teacher.model  # load outside the timer
    r = benchmark.pedantic(_distil, args=(demo, teacher, tmp_path), rounds=1, iterations=1)
    RESULTS["local"] = r
    benchmark.extra_info.update(r)
    assert r["asked"] > 0


@pytest.mark.benchmark(group="distill")
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_distill_local_teacher_llama_cpp(benchmark, demo, tmp_path):
    from aios_fast.evolve.teachers import LocalTeacher

    teacher = LocalTeacher(backend="llama_cpp", n_threads=1)   # one thread, as the other sides
    teacher.model
    r = benchmark.pedantic(_distil, args=(demo, teacher, tmp_path), rounds=1, iterations=1)
    RESULTS["local_llama_cpp"] = r
    benchmark.extra_info.update(r)
    if "local" in RESULTS and RESULTS["local"]["teacher_seconds"]:
        benchmark.extra_info["questions_per_min_ratio_vs_local"] = round(
            r["questions_per_min"] / max(1e-9, RESULTS["local"]["questions_per_min"]), 2)
    assert r["asked"] > 0


@pytest.mark.benchmark(group="distill")
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_distill_llama_cpp_server(benchmark, demo, tmp_path):
    from aios_fast.evolve.llama_server import LlamaServer
    from aios_fast.evolve.teachers import OpenAICompatibleProvider

    with LlamaServer(n_threads=1) as srv:
        teacher = OpenAICompatibleProvider(srv.base_url, srv.model, timeout=120)
        r = benchmark.pedantic(_distil, args=(demo, teacher, tmp_path), rounds=1, iterations=1)
    RESULTS["llama_cpp"] = r
    benchmark.extra_info.update(r)
    for key in ("local", "local_llama_cpp"):
        if key in RESULTS and RESULTS[key]["teacher_seconds"]:
            benchmark.extra_info[f"questions_per_min_ratio_vs_{key}"] = round(
                r["questions_per_min"] / max(1e-9, RESULTS[key]["questions_per_min"]), 2)
    print("\n" + json.dumps(RESULTS, indent=1))
    assert r["asked"] > 0
