"""LoRARouter on the bundled MiniLM: held-out routing accuracy, calibration (ECE, AUROC),
vectorised scoring against a per-skill reference, library-backed refresh and bad input.

The routing set (tests/data/routing/domains.json) is never used to tune the router's defaults;
those come from python/aios_fast/route/data/tuning.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from aios_fast import InputError, LoRARouter, RouteResult
from aios_fast.lora.random import random_card
from aios_fast.route.calibrate import (DEFAULT_MAP, ConfidenceMap, auroc, expected_calibration_error,
                                       general_negatives)
from aios_fast.route.library import SkillLibrary

DATA = json.loads((Path(__file__).parent / "data" / "routing" / "domains.json").read_text())
DOMAINS = DATA["domains"]
HELDOUT = [(q, name) for name, d in DOMAINS.items() for q in d["heldout"]]
OOD = DATA["out_of_domain"]
SHAPES = {"encoder.layer.0.attention.self.query": (384, 384)}


def evaluate(router):
    """Held-out accuracy, ECE (10 bins; OOD queries count as wrong) and AUROC (in vs out)."""
    rs = router.route_many([q for q, _ in HELDOUT] + OOD)
    conf = np.array([r.confidence for r in rs])
    right = np.array([r.top == n for r, (_, n) in zip(rs, HELDOUT)] + [False] * len(OOD))
    in_domain = np.r_[np.ones(len(HELDOUT)), np.zeros(len(OOD))]
    return (float(right[:len(HELDOUT)].mean()), expected_calibration_error(conf, right),
            auroc(conf, in_domain))


@pytest.mark.slow  # ~20 s on the shared 2-core machine (encodes ~200 texts, fits twice)
def test_heldout_routing_with_default_and_fitted_calibration(domain_router, encoder):
    assert len(DOMAINS) >= 5 and not {q for q, _ in HELDOUT} & {q for d in DOMAINS.values() for q in d["register"]}
    acc, ece, au = evaluate(domain_router)
    print(f"\ndefault map: accuracy {acc:.3f}  ECE {ece:.3f}  AUROC {au:.3f}")
    assert domain_router.calibration_state == "default"
    assert acc >= 0.85
    assert au >= 0.88               # the tuning-set defaults already separate in from out
    report = domain_router.calibrate(save=False)
    print(f"fit (out-of-fold): {report}")
    assert report["n_negatives"] == len(general_negatives()) and report["n_in_domain"] == 60
    assert report["ece"] <= 0.15 and report["auroc"] >= 0.85
    acc2, ece2, au2 = evaluate(domain_router)
    print(f"fitted map:  accuracy {acc2:.3f}  ECE {ece2:.3f}  AUROC {au2:.3f}")
    assert acc2 == acc              # calibration changes confidence, never the ranking
    assert ece2 <= 0.2 and ece2 < ece
    assert au2 >= 0.9
    assert domain_router.calibration_state == "fitted"


def test_route_result_shape_and_threshold(domain_router):
    r = domain_router.route("how long should I boil pasta for", top_k=2)
    assert isinstance(r, RouteResult) and len(r.ranked) == 2
    assert r.ranked[0][0] == "cooking" and r.ranked[0][1] >= r.ranked[1][1]
    assert r.margin == pytest.approx(r.ranked[0][1] - r.ranked[1][1], abs=1e-6)
    assert 0.0 <= r.confidence <= 1.0
    assert r.skill == ("cooking" if r.confidence >= domain_router.threshold else None)
    ood = domain_router.route("Who won the Tour de France in 1998?")
    assert ood.skill is None and ood.confidence < 0.3
    assert domain_router.select("how long should I boil pasta for", threshold=0.0) == ["cooking"]
    assert domain_router.select("how long should I boil pasta for", threshold=0.99) == []


def naive_scores(router, skills, E):
    """Reference: a Python loop over skills, mean of each skill's top-3 cosine similarities."""
    out = torch.zeros(E.shape[0], len(skills))
    for j, (name, emb) in enumerate(skills):
        sims = E @ torch.as_tensor(emb).T
        k = min(3, sims.shape[1])
        out[:, j] = sims.topk(k, dim=1).values.mean(1)
    return out


def test_vectorised_scores_equal_a_per_skill_loop(encoder):
    r = LoRARouter(encoder)
    rng = np.random.default_rng(0)
    texts = [q for d in DOMAINS.values() for q in d["register"]]
    counts = [1, 2, 5, 10, 3, 7]                       # ragged: the padded path
    skills = []
    for i, c in enumerate(counts):
        ex = [texts[j] for j in rng.choice(len(texts), c, replace=False)]
        r.add_skill(f"s{i}", examples=ex)
        skills.append((f"s{i}", r._skills[f"s{i}"].embeddings))
    E = encoder.encode([q for q, _ in HELDOUT[:10]])
    assert r.example_skills == [n for n, _ in skills]
    torch.testing.assert_close(r.scores(E), naive_scores(r, skills, E), atol=1e-5, rtol=1e-5)
    # every skill with 3 examples: the uniform (reshape) path
    u = LoRARouter(encoder)
    for i in range(4):
        u.add_skill(f"u{i}", examples=texts[3 * i:3 * i + 3])
    assert u._index.uniform
    ref = naive_scores(u, [(f"u{i}", u._skills[f"u{i}"].embeddings) for i in range(4)], E)
    torch.testing.assert_close(u.scores(E), ref, atol=1e-5, rtol=1e-5)
    # route_embeddings == route
    a = u.route_many([q for q, _ in HELDOUT[:10]])
    b = u.route_embeddings(E)
    assert [x.ranked for x in a] == [x.ranked for x in b]


class CountingEncoder:
    def __init__(self, enc):
        self._enc, self.texts = enc, []
        self.model, self.pooling, self.max_length, self.dim = enc.model, enc.pooling, enc.max_length, enc.dim

    def encode(self, texts, **kw):
        self.texts += list(texts)
        return self._enc.encode(texts, **kw)


def test_adding_or_removing_a_skill_embeds_only_that_skill(encoder):
    enc = CountingEncoder(encoder)
    r = LoRARouter(enc)
    r.add_skill("cooking", examples=DOMAINS["cooking"]["register"])
    r.add_skill("travel", examples=DOMAINS["travel"]["register"])
    enc.texts.clear()
    r.add_skill("gardening", examples=DOMAINS["gardening"]["register"])
    assert enc.texts == DOMAINS["gardening"]["register"]
    enc.texts.clear()
    r.remove_skill("travel")
    assert enc.texts == [] and r.skills == ["cooking", "gardening"]


@pytest.mark.slow  # embeds and calibrates a library of six skills
def test_library_backed_router_refresh_and_saved_calibration(tmp_path, encoder):
    lib = SkillLibrary(tmp_path, encoder=encoder)
    names = list(DOMAINS)
    for i, name in enumerate(names[:5]):
        lib.add(random_card(SHAPES, name=name, rank=2, seed=i), DOMAINS[name]["register"],
                DOMAINS[name]["description"])
    r = LoRARouter(encoder, library=lib)
    assert r.skills == sorted(names[:5]) and r.calibration_state == "default"
    metrics = r.calibrate()
    assert lib.calibration_path.is_file()
    again = LoRARouter(encoder, library=tmp_path)          # a directory works too
    assert again.calibration_state == "fitted"
    assert again.confidence_map.to_dict() == ConfidenceMap.from_dict(r.confidence_map.to_dict()).to_dict()
    assert again.confidence_map.metrics["ece"] == pytest.approx(metrics["ece"])
    # one more skill out of six changes 1/6 < 25 %: still valid
    lib.add(random_card(SHAPES, name=names[5], rank=2, seed=9), DOMAINS[names[5]]["register"])
    again.refresh()
    assert names[5] in again.skills and again.calibration_state == "fitted"
    # a new version of two more skills: 3 of 8 signature keys changed -> stale, defaults used
    for n in names[:2]:
        lib.add(random_card(SHAPES, name=n, rank=2, seed=20), DOMAINS[n]["register"][:5])
    again.refresh()
    assert again.calibration_state == "stale" and again.confidence_map is DEFAULT_MAP
    lib.remove(names[0])
    again.refresh()
    assert names[0] not in again.skills


def test_empty_router_and_bad_input(encoder):
    r = LoRARouter(encoder)
    assert r.route("anything") == RouteResult([], 0.0, 0.0, None)
    assert r.route_many([]) == []
    with pytest.raises(InputError, match="no skill named 'nope'"):
        r.remove_skill("nope")
    with pytest.raises(InputError, match="give examples"):
        r.add_skill("empty", examples=[])
    with pytest.raises(InputError, match="is empty or blank"):
        r.add_skill("blank", examples=["fine", "   "])
    with pytest.raises(InputError, match="skill name"):
        r.add_skill("bad name!", examples=["x"])
    with pytest.raises(InputError, match="threshold"):
        LoRARouter(encoder, threshold=1.5)
    with pytest.raises(InputError, match="at least 2 skills"):
        r.calibrate()
    r.register_virtual_candidate("weather", "Questions about the weather forecast")
    assert r.route("will it rain tomorrow").top == "weather"
    with pytest.raises(InputError, match="width 10"):
        r.route_embeddings(np.zeros((1, 10), np.float32))
    with pytest.raises(InputError, match="top_k"):
        r.route("x", top_k=0)
    with pytest.raises(InputError, match="query must be a string"):
        r.route(3)


def test_register_card_uses_examples_in_metadata(encoder):
    r = LoRARouter(encoder)
    c = random_card(SHAPES, name="cars", rank=2,
                    metadata={"examples": json.dumps(DOMAINS["car_maintenance"]["register"])})
    r.register_card(c)
    r.add_skill("travel", examples=DOMAINS["travel"]["register"])
    assert r.route("my brakes make a grinding noise").top == "cars"
    bad = random_card(SHAPES, name="bad", rank=2, metadata={"examples": "[1, 2]"})
    with pytest.raises(Exception, match="examples"):
        r.register_card(bad)
