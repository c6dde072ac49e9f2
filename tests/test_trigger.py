"""CognitiveTrigger: confident queries fire nothing; paraphrases of one new topic fire exactly
one request; failures back off (with jitter, capped, reset on success); the budget holds;
state and the decision log survive a restart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aios_fast import CognitiveTrigger, InputError, LearningRequest, RouteResult
from aios_fast.evolve.trigger import read_decision_log

DATA = json.loads((Path(__file__).parent / "data" / "routing" / "domains.json").read_text())

# twenty ways users ask about one topic no skill covers (beekeeping)
BEEKEEPING = [
    "how do I get started with beekeeping as a hobby",
    "what equipment does a beginner beekeeper need",
    "when is the best time to harvest honey from a hive",
    "my bees are swarming, what should I do",
    "how do I know if my beehive has a queen",
    "what do bees eat in winter, should I feed them sugar syrup",
    "how often should I inspect my beehive",
    "how to treat varroa mites in a bee colony",
    "is a langstroth hive better than a top bar hive",
    "why are my honey bees dying at the hive entrance",
    "how much honey can one hive produce in a year",
    "how do I avoid getting stung when opening the hive",
    "can I keep bees if my neighbours are close",
    "should I buy a nuc or a package of bees for my first hive",
    "how do I split a strong bee colony",
    "how to get honey out of the frames without an extractor",
    "signs that a bee colony is queenless",
    "how to prepare beehives for the cold months",
    "which direction should the entrance of a new beehive face",
    "do I need to register my beehives",
]


def test_confident_query_fires_nothing(domain_router, tmp_path):
    trig = CognitiveTrigger(state_dir=tmp_path, min_support=1)
    q = DATA["domains"]["car_maintenance"]["register"][0]
    r = domain_router.route(q)
    assert r.skill == "car_maintenance" and r.confidence >= 0.5
    d = trig.observe(q, r)
    assert (d.fired, d.reason, d.topic_id, d.request) == (False, "confident", None, None)
    assert trig.topics() == []


def test_twenty_paraphrases_of_a_new_topic_fire_exactly_one_request(domain_router, encoder, tmp_path):
    trig = CognitiveTrigger(min_support=5, state_dir=tmp_path)
    E = encoder.encode(BEEKEEPING)
    routes = domain_router.route_embeddings(E)
    assert all(trig.is_unsure(r) for r in routes)          # no skill covers beekeeping
    decisions = [trig.observe(q, r, embedding=e) for q, r, e in zip(BEEKEEPING, routes, E)]
    fired = [d for d in decisions if d.fired]
    assert len(fired) == 1
    req = fired[0].request
    assert isinstance(req, LearningRequest) and set(req.queries) <= set(BEEKEEPING)
    assert len(req.queries) >= 5
    # leader clustering may start a stray topic or two before the centroid settles; those
    # merge into the main topic, whose id never changes once it has fired
    assert sum(d.topic_id == req.topic_id for d in decisions) >= 17
    topics = {t["topic_id"]: t for t in trig.topics()}
    assert topics[req.topic_id]["support"] >= 17 and topics[req.topic_id]["state"] == "pending"
    assert all(t["support"] < 5 for k, t in topics.items() if k != req.topic_id)
    assert {d.reason for d in decisions[decisions.index(fired[0]) + 1:]
            if d.topic_id == req.topic_id} == {"job_pending"}
    # a near copy adds no support
    d = trig.observe(BEEKEEPING[0] + "?", routes[0], embedding=encoder.encode([BEEKEEPING[0] + "?"]))
    assert d.topic_id == req.topic_id and d.reason == "job_pending"
    log = read_decision_log(trig.log_path)
    assert len(log) == 21 and sum(r["fired"] for r in log) == 1
    assert log[0]["query"] == BEEKEEPING[0] and log[0]["topic_id"] == req.topic_id


def test_unrelated_unsure_queries_do_not_join_the_topic(domain_router, encoder):
    trig = CognitiveTrigger(min_support=5)
    mixed = [q for pair in zip(BEEKEEPING[:12], DATA["out_of_domain"][:12]) for q in pair]
    E = encoder.encode(mixed)
    decisions = [trig.observe(q, r, embedding=e) for q, r, e in zip(mixed, domain_router.route_embeddings(E), E)]
    fired = [d for d in decisions if d.fired]
    assert len(fired) == 1 and set(fired[0].request.queries) <= set(BEEKEEPING)
    topic = {t["topic_id"]: t for t in trig.topics()}[fired[0].topic_id]
    assert topic["support"] >= 9 and set(topic["queries"]) <= set(BEEKEEPING)
    # the general questions stay apart, in topics too small to fire
    assert all(t["support"] < 5 for t in trig.topics() if t["topic_id"] != fired[0].topic_id)


class Clock:
    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        return self.t


def unsure(conf=0.1):
    return RouteResult([("x", 0.2)], conf, 0.01, None)


def vec(i, dim=16, noise=0.0, seed=0):
    e = np.zeros(dim, np.float32)
    e[i] = 1.0
    if noise:
        e += np.random.default_rng(seed).normal(0, noise, dim).astype(np.float32)
    return e / np.linalg.norm(e)


def feed(trig, topic, n, start=0):
    out = []
    for k in range(start, start + n):
        out.append(trig.observe(f"topic {topic} query {k}", unsure(), embedding=vec(topic, noise=0.1, seed=k)))
    return out


def test_failed_job_backs_off_exponentially_with_jitter_and_cap(tmp_path):
    clock = Clock()
    trig = CognitiveTrigger(min_support=3, backoff=100.0, backoff_cap=350.0, jitter=0.1,
                            duplicate_similarity=0.999, clock=clock, seed=1, state_dir=tmp_path)
    d = [x for x in feed(trig, 0, 3) if x.fired][0]
    tid = d.topic_id
    waits = []
    for failure in range(4):
        retry = trig.job_failed(tid)
        waits.append(retry - clock.t)
        blocked = feed(trig, 0, 1, start=10 + failure)[0]
        assert blocked.reason == "backoff" and blocked.retry_at == pytest.approx(retry)
        clock.t = retry + 1
        again = feed(trig, 0, 1, start=20 + failure)[0]
        assert again.fired, again
    assert 90 <= waits[0] <= 110 and 180 <= waits[1] <= 220
    assert 315 <= waits[2] <= 385 and 315 <= waits[3] <= 385       # capped at 350 (± jitter)
    assert len({round(w, 6) for w in waits}) == 4                  # jittered, not identical
    # state survives a restart: failures count on, the pending request is released
    restarted = CognitiveTrigger(min_support=3, backoff=100.0, backoff_cap=350.0, jitter=0.1,
                                 clock=clock, seed=1, state_dir=tmp_path)
    t = {x["topic_id"]: x for x in restarted.topics()}[tid]
    assert t["failures"] == 4 and t["state"] == "collecting" and t["requests"] == 5
    retry = restarted.job_failed(tid)
    assert 315 <= retry - clock.t <= 385
    # success resets the backoff
    clock.t = retry + 1
    assert feed(restarted, 0, 1, start=40)[0].fired
    restarted.job_succeeded(tid)
    assert {x["topic_id"]: x for x in restarted.topics()}[tid]["failures"] == 0
    assert restarted.job_failed(tid) - clock.t <= 110


def test_hourly_budget(tmp_path):
    clock = Clock()
    trig = CognitiveTrigger(min_support=2, max_requests_per_hour=2, clock=clock, state_dir=tmp_path)
    assert feed(trig, 0, 2)[-1].fired
    assert feed(trig, 1, 2)[-1].fired
    d = feed(trig, 2, 2)[-1]
    assert d.reason == "budget" and not d.fired and trig.requests_last_hour() == 2
    # the budget is persisted across a restart (flush: support gathered since the last write)
    trig.flush()
    again = CognitiveTrigger(min_support=2, max_requests_per_hour=2, clock=clock, state_dir=tmp_path)
    assert feed(again, 2, 1, start=5)[-1].reason == "budget"
    clock.t += 3601
    assert feed(again, 2, 1, start=6)[-1].fired


def test_bad_input(tmp_path):
    with pytest.raises(InputError, match="threshold"):
        CognitiveTrigger(threshold=2)
    with pytest.raises(InputError, match="min_support"):
        CognitiveTrigger(min_support=0)
    trig = CognitiveTrigger()
    with pytest.raises(InputError, match="pass the query's embedding"):
        trig.observe("what is this", unsure())
    with pytest.raises(InputError, match="non-zero"):
        trig.observe("what is this", unsure(), embedding=np.zeros(8))
    with pytest.raises(InputError, match="unknown topic"):
        trig.job_failed("t-nope")
    trig.observe("a", unsure(), embedding=vec(0))
    with pytest.raises(InputError, match="width 8"):
        trig.observe("b", unsure(), embedding=np.ones(8))
    (tmp_path / "trigger_state.json").write_text("{broken")
    t2 = CognitiveTrigger(state_dir=tmp_path)
    assert t2.problems and "unreadable" in t2.problems[0] and t2.topics() == []
