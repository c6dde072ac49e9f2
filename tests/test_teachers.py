"""Teachers against real servers on 127.0.0.1: a scriptable fault server (garbage, stalls, 429
with Retry-After, dropped connections, rejected response formats), llama-cpp-python's server on
the bundled SmolLM2 GGUF, and the in-process LocalTeacher."""

from __future__ import annotations

import json

import pytest
from servers.fault_server import drop, garbage, ok, rate_limited, reject_format, stall, status

from aios_fast.errors import AiosError, InputError
from aios_fast.evolve.parsing import QA_SCHEMA, count_reasons, parse_qa_pairs
from aios_fast.evolve.teachers import (BudgetExceeded, LocalTeacher, OpenAICompatibleProvider, Teacher,
                                       TeacherBudget, TeacherError)

MSG = [{"role": "user", "content": "Write one question about ferries."}]
PAIRS_JSON = json.dumps({"pairs": [{"question": "When does the ferry leave?", "answer": "Every forty minutes."}]})


def provider(srv, **kw) -> OpenAICompatibleProvider:
    kw.setdefault("timeout", 2.0)
    kw.setdefault("backoff", 0.01)
    return OpenAICompatibleProvider(srv.base_url, "fault-model", **kw)


# ------------------------------------------------------------------------- happy path, key
def test_completion_and_key_handling(fault_server, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.DEBUG)  # everything the client and we log, at every level
    monkeypatch.setenv("AIOS_TEACHER_API_KEY", "sk-secret-0123456789")
    fault_server.script(rate_limited("0.01"), ok("The ferry leaves every forty minutes."), status(401, "invalid key"))
    p = provider(fault_server)
    assert isinstance(p, Teacher) and p.name() == f"openai-compatible:fault-model@{fault_server.base_url}"
    reply = p.complete(MSG, max_tokens=32, temperature=0.0)
    assert reply.text == "The ferry leaves every forty minutes."
    assert (reply.prompt_tokens, reply.completion_tokens, reply.attempts) == (11, 9, 2)
    req = fault_server.requests[1]
    assert req.path == "/v1/chat/completions"
    assert req.body["model"] == "fault-model" and req.body["messages"] == MSG and req.body["max_tokens"] == 32
    assert "response_format" not in req.body
    assert req.headers["authorization"] == "Bearer sk-secret-0123456789"
    # the key is sent, never shown
    with pytest.raises(TeacherError, match="HTTP 401") as err:
        p.query("hello", system="be brief")
    assert "sk-secret" not in str(err.value) and "sk-secret" not in repr(p) and "<set>" in repr(p)
    assert fault_server.requests[2].body["messages"][0] == {"role": "system", "content": "be brief"}
    assert len(fault_server.requests) == 3  # the 401 was not retried
    assert "retry 1 of 3" in caplog.text and "sk-secret" not in caplog.text


def test_explicit_key_wins_and_no_key_is_allowed(fault_server, monkeypatch):
    monkeypatch.delenv("AIOS_TEACHER_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fault_server.script(ok("a"), ok("b"))
    assert provider(fault_server).query("hi") == "a"
    assert provider(fault_server, api_key="sk-arg").query("hi") == "b"
    assert fault_server.requests[1].headers["authorization"] == "Bearer sk-arg"
    assert "<none>" in repr(provider(fault_server))


# ------------------------------------------------------------------------------- faults
@pytest.mark.parametrize("fault, message, retried", [
    pytest.param(garbage(), "malformed reply", False, id="garbage"),
    pytest.param(status(200, "not a completion"), "malformed reply|without choices", False, id="json-not-completion"),
    pytest.param(stall(5.0), r"timed out after 0\.3 s", True, id="stall"),
    pytest.param(drop(), "connection failed .*RemoteProtocolError", True, id="dropped-connection"),
    pytest.param(status(503, "overloaded"), "HTTP 503", True, id="http-503"),
    pytest.param(status(404, "no such model"), "HTTP 404", False, id="http-404"),
])
def test_each_fault_is_a_teacher_error(fault_server, fault, message, retried):
    fault_server.script(default=fault)
    p = provider(fault_server, timeout=0.3, max_retries=2)
    with pytest.raises(TeacherError, match=message):
        p.complete(MSG)
    assert len(fault_server.requests) == (3 if retried else 1)
    assert p.stats["failures"] == 1 and p.stats["retries"] == (2 if retried else 0)
    assert isinstance(TeacherError("x"), (AiosError, RuntimeError))


def test_transient_faults_recover(fault_server):
    fault_server.script(drop(), status(500), ok(PAIRS_JSON))
    reply = provider(fault_server, max_retries=2).complete(MSG)
    assert reply.attempts == 3 and parse_qa_pairs(reply.text)[0] == [
        ("When does the ferry leave?", "Every forty minutes.")]


def test_retry_after_is_honoured_once_by_one_layer(fault_server):
    fault_server.script(rate_limited(1), ok("after the wait"))
    reply = provider(fault_server, max_retries=3).complete(MSG)
    reqs = fault_server.requests
    assert reply.text == "after the wait" and reply.attempts == 2 and len(reqs) == 2
    assert 0.95 <= reqs[1].t - reqs[0].t < 3.0  # waited what the server asked, not the client's backoff
    # persistent 429: exactly 1 + max_retries requests (a second retry layer would multiply them)
    fault_server.script(default=rate_limited("0.05"))
    p = provider(fault_server, max_retries=2)
    with pytest.raises(TeacherError, match="failed after 3 attempt"):
        p.complete(MSG)
    assert len(fault_server.requests) == 3


def test_retry_after_too_long_fails_fast(fault_server):
    fault_server.script(default=rate_limited(120))
    with pytest.raises(TeacherError, match="Retry-After 120 s, longer than max_retry_after=5"):
        provider(fault_server, max_retry_after=5).complete(MSG)
    assert len(fault_server.requests) == 1


def test_garbage_content_is_counted_never_data(fault_server):
    replies = ["I am sorry, I cannot do that.", '{"question": "Why?", "answer": "..."}', "[{'q': 'x'"]
    fault_server.script(*map(ok, replies))
    p = provider(fault_server)
    kept, reasons = [], []
    for _ in replies:
        pairs, why = parse_qa_pairs(p.complete(MSG, json_schema=QA_SCHEMA).text)
        kept += pairs
        reasons += why
    assert kept == []
    assert count_reasons(reasons) == {"no_pairs_found": 1, "placeholder": 1, "invalid_json": 1}


# ------------------------------------------------------------------------- structured output
def test_json_schema_falls_back_when_rejected_and_remembers(fault_server):
    fault_server.script(default=reject_format(PAIRS_JSON))
    p = provider(fault_server)
    first = p.complete(MSG, json_schema=QA_SCHEMA)
    formats = [r.body.get("response_format", {}).get("type") for r in fault_server.requests]
    assert formats == ["json_schema", "json_object", None]
    assert fault_server.requests[0].body["response_format"]["json_schema"]["schema"] == QA_SCHEMA
    assert first.structured is None and first.attempts == 3 and p.stats["format_fallbacks"] == 2
    fault_server.script(default=reject_format(PAIRS_JSON))
    p.complete(MSG, json_schema=QA_SCHEMA)
    assert [("response_format" in r.body) for r in fault_server.requests] == [False]


def test_json_schema_is_sent_when_accepted(fault_server):
    fault_server.script(ok(PAIRS_JSON))
    reply = provider(fault_server).complete(MSG, json_schema=QA_SCHEMA)
    assert reply.structured == "json_schema"
    assert provider(fault_server, structured="off")._format_level == 2


# ------------------------------------------------------------------------------- budget
def test_budget_stops_requests(fault_server):
    fault_server.script(default=ok("fine"))
    budget = TeacherBudget(max_requests=2)
    p = provider(fault_server, budget=budget)
    p.complete(MSG)
    p.complete(MSG)
    with pytest.raises(BudgetExceeded, match="2 of max_requests=2"):
        p.complete(MSG)
    assert len(fault_server.requests) == 2 and budget.requests == 2
    budget.reset()
    p.complete(MSG)
    assert len(fault_server.requests) == 3


def test_budget_counts_retries_tokens_and_seconds(fault_server):
    fault_server.script(rate_limited("0.05"), ok("x" * 40), default=ok("more"))
    budget = TeacherBudget(max_tokens=15)
    p = provider(fault_server, budget=budget)
    p.complete(MSG, max_tokens=100)
    assert budget.requests == 2 and budget.tokens == 11 + 10
    assert fault_server.requests[1].body["max_tokens"] == 15  # never asks for more than remains
    with pytest.raises(BudgetExceeded, match="max_tokens=15"):
        p.complete(MSG)
    assert len(fault_server.requests) == 2

    fault_server.script(default=stall(5.0))
    budget = TeacherBudget(max_seconds=0.4)
    p = provider(fault_server, budget=budget, timeout=10.0, max_retries=5)
    with pytest.raises(BudgetExceeded, match="max_seconds=0.4|remaining"):
        p.complete(MSG)  # the per-attempt timeout is cut to the budget, then retries stop
    assert budget.seconds >= 0.35 and len(fault_server.requests) <= 2


def test_arguments_are_validated(fault_server):
    with pytest.raises(InputError, match="base_url"):
        OpenAICompatibleProvider("localhost:8080", "m")
    with pytest.raises(InputError, match="max_retries"):
        OpenAICompatibleProvider("http://127.0.0.1:1/v1", "m", max_retries=-1)
    with pytest.raises(InputError, match="max_requests"):
        TeacherBudget(max_requests=0)
    p = provider(fault_server)
    with pytest.raises(InputError, match=r"messages\[0\]"):
        p.complete([{"role": "robot", "content": "x"}])
    with pytest.raises(InputError, match="temperature"):
        p.complete(MSG, temperature=5)
    with pytest.raises(InputError, match="prompt"):
        p.query("  ")
    assert fault_server.requests == []


def test_unreachable_server(fault_server):
    url = fault_server.base_url
    fault_server.stop()
    p = OpenAICompatibleProvider(url, "m", timeout=0.5, max_retries=1, backoff=0.01)
    with pytest.raises(TeacherError, match="failed after 2 attempt.*connection failed"):
        p.query("hello")


# ------------------------------------------------------------------------- real servers
PASSAGE = ("The Quillmarsh ferry crosses the Ostrel estuary every forty minutes between six in the morning "
           "and ten at night. Bicycles travel free.")


@pytest.mark.slow
def test_llama_cpp_server_real_completion_and_pairs(llama_server):
    p = OpenAICompatibleProvider(llama_server.base_url, llama_server.model, timeout=60, max_retries=1)
    text = p.query("What is the capital of France? Answer in one word.", max_tokens=12)
    assert "paris" in text.lower()  # a real model answered
    reply = p.complete([
        {"role": "system", "content": "You write question-answer pairs as JSON."},
        {"role": "user", "content": f"Passage: {PASSAGE}\nWrite 2 questions a traveller could ask, each with "
                                    f"its answer from the passage."}],
        max_tokens=120, temperature=0.0, json_schema=QA_SCHEMA)
    assert reply.prompt_tokens > 20 and 0 < reply.completion_tokens <= 120
    assert reply.structured in ("json_schema", "json_object")  # the server constrains decoding...
    assert reply.text.lstrip().startswith("{")  # ...so the reply is a JSON object
    pairs, reasons = parse_qa_pairs(reply.text)
    assert pairs, (reply.text, reasons)
    assert all(q.strip() and a.strip() for q, a in pairs)


def _needs_llama_cpp():
    from aios_fast.evolve.local_llama import llama_cpp_available

    if llama_cpp_available():
        pytest.skip(llama_cpp_available())


@pytest.fixture(scope="module", params=["llama_cpp", "transformers"])
def local_teacher(request):
    if request.param == "llama_cpp":
        _needs_llama_cpp()
    return LocalTeacher(backend=request.param)


@pytest.mark.slow
def test_local_teacher_generates(local_teacher, one_thread):
    assert isinstance(local_teacher, Teacher) and local_teacher.name().startswith("local:SmolLM2")
    assert local_teacher.backend in repr(local_teacher)
    budget = TeacherBudget(max_requests=2)
    local_teacher.budget = budget
    try:
        msgs = [{"role": "user", "content": "Name a colour."}]
        a = local_teacher.complete(msgs, max_tokens=8, temperature=0.0)
        b = local_teacher.complete(msgs, max_tokens=8, temperature=0.0)
        assert a.text.strip() and b.text == a.text  # greedy decoding is deterministic
        assert 0 < a.completion_tokens <= 8 and a.prompt_tokens > 5
        assert budget.requests == 2 and budget.tokens >= a.total_tokens
        with pytest.raises(BudgetExceeded):
            local_teacher.query("again")
        local_teacher.budget = None
        assert local_teacher.query("Say hello.", system="You are terse.", max_tokens=6).strip()
        # a reply depends on its prompt only, not on the prompts before it (llama.cpp's KV cache
        # reuse of a shared prefix changed greedy replies)
        assert local_teacher.complete(msgs, max_tokens=8, temperature=0.0).text == a.text
        # sampling: the teacher's seed makes a run reproducible, call by call
        again = LocalTeacher(backend=local_teacher.backend, seed=local_teacher.seed)
        again._model = local_teacher.model   # the same engine, a fresh call counter
        first = [again.complete(msgs, max_tokens=12, temperature=1.5).text for _ in range(3)]
        again._calls = 0
        assert [again.complete(msgs, max_tokens=12, temperature=1.5).text for _ in range(3)] == first
        assert len(set(first)) > 1   # each call draws from its own seed
    finally:
        local_teacher.budget = None


@pytest.mark.slow
def test_llama_engine_keeps_only_the_shared_turns(one_thread):
    """The in-process llama.cpp engine keeps the KV cache of a prompt's earlier turns (a system
    prompt and few-shot examples) and evaluates only the last one; a reply stays a function of
    its messages alone: the same conversation asked first, or after others that share those turns
    and even the start of the last one, gets the same greedy reply."""
    _needs_llama_cpp()
    from aios_fast.bundled import smollm2_gguf
    from aios_fast.evolve.local_llama import LlamaCppEngine

    shots = [{"role": "system", "content": "You write short questions that customers ask a support desk."},
             {"role": "user", "content": "Fact: Each passenger may bring one suitcase up to 20 kg."},
             {"role": "assistant", "content": "How heavy can my suitcase be on the ferry?"}]
    ask = [shots + [{"role": "user", "content": f"Fact: {fact}"}] for fact in (
        "A membership can be frozen for up to three months a year at no charge.",
        "A membership can be cancelled online with one month's notice.",
        "The printer's rear tray holds up to 50 sheets of photo paper.")]
    first = LlamaCppEngine(smollm2_gguf(), n_threads=1)
    second = LlamaCppEngine(smollm2_gguf(), n_threads=1)
    try:
        alone = first.complete(ask[1], max_tokens=16, temperature=0.0, seed=0)["text"]
        assert first._kept is not None and len(first._kept) >= 32   # the shared turns were kept
        for m in (ask[2], ask[0]):
            second.complete(m, max_tokens=16, temperature=0.0, seed=0)
        # ask[1] shares more than the earlier turns with ask[0]; only those turns are reused
        evaluated, real_eval = [], second.llm.eval
        second.llm.eval = lambda tokens: (evaluated.append(len(tokens)), real_eval(tokens))[1]
        after = second.complete(ask[1], max_tokens=16, temperature=0.0, seed=0)["text"]
        whole = second.llm.tokenize(second._formatter(messages=ask[1], add_generation_prompt=True).encode(),
                                    add_bos=False, special=True)
        assert evaluated[0] == len(whole) - len(second._kept) > 0
        assert after == alone and alone
        # a conversation without earlier turns is evaluated from scratch and drops what was kept
        second.complete([{"role": "user", "content": "Name a colour."}], max_tokens=4, temperature=0.0, seed=0)
        assert second._kept is None
        assert second.complete(ask[1], max_tokens=16, temperature=0.0, seed=0)["text"] == alone
    finally:
        first.close()
        second.close()


def test_local_teacher_backend_is_checked_and_chosen():
    with pytest.raises(InputError, match="backend: expected one of auto, llama_cpp, transformers"):
        LocalTeacher(backend="vllm")

    class _LM:   # anything with generate() is taken as a loaded CausalLM
        def generate(self, *a, **k):
            return ""

    assert LocalTeacher(_LM()).backend == "transformers"
    with pytest.raises(InputError, match="needs a GGUF path"):
        LocalTeacher(_LM(), backend="llama_cpp")
    from aios_fast.evolve.local_llama import llama_cpp_available

    assert LocalTeacher().backend == ("transformers" if llama_cpp_available() else "llama_cpp")


def test_llama_cpp_backend_refuses_a_broken_gguf(tmp_path):
    _needs_llama_cpp()
    from aios_fast.evolve.local_llama import LlamaCppEngine

    with pytest.raises(InputError, match="does not exist"):
        LlamaCppEngine(tmp_path / "none.gguf")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(InputError, match=r"broken\.gguf: llama\.cpp could not load it"):
        LlamaCppEngine(bad)
    with pytest.raises(InputError, match="n_threads must be an int >= 1"):
        LlamaCppEngine(bad, n_threads=0)


@pytest.mark.slow
def test_llama_cpp_teacher_constrains_json_to_the_schema(one_thread):
    _needs_llama_cpp()
    t = LocalTeacher(backend="llama_cpp")
    msgs = [{"role": "system", "content": "You write question-answer pairs as JSON."},
            {"role": "user", "content": f"Passage: {PASSAGE}\nWrite 2 questions a traveller could ask, each with "
                                        f"its answer from the passage."}]
    plain = t.complete(msgs, max_tokens=120, temperature=0.0)
    assert plain.structured is None
    reply = t.complete(msgs, max_tokens=160, temperature=0.0, json_schema=QA_SCHEMA)
    assert reply.structured == "json_schema" and reply.finish_reason in ("stop", "length")
    if reply.finish_reason == "stop":   # a finished constrained reply is the schema's JSON, nothing else
        obj = json.loads(reply.text)
        assert isinstance(obj, dict) and isinstance(obj["pairs"], list)
    pairs, reasons = parse_qa_pairs(reply.text)
    assert pairs, (reply.text, reasons)
    assert all(q.strip() and a.strip() for q, a in pairs)


# ------------------------------------------------------------------------- LlamaServer
def test_llama_server_reports_what_is_missing(monkeypatch, tmp_path):
    from aios_fast.errors import BackendUnavailableError
    from aios_fast.evolve import llama_server as ls

    with pytest.raises(InputError, match="does not exist"):
        ls.LlamaServer(tmp_path / "none.gguf")
    # a module that cannot exist here stands for an environment without the [server] extra
    monkeypatch.setattr(ls, "_SERVER_MODULES", ls._SERVER_MODULES + ("aios_no_such_module_x",))
    with pytest.raises(BackendUnavailableError, match=r"pip install 'llama-cpp-python\[server\]'"):
        ls.LlamaServer().start()


def test_llama_server_start_failure_is_explained(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:  # never imported here: it runs in the child
        pytest.skip("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]'")
    from aios_fast.errors import BackendUnavailableError
    from aios_fast.evolve.llama_server import LlamaServer

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)  # the magic, then nothing a loader can use
    srv = LlamaServer(bad, startup_timeout=60)
    with pytest.raises(BackendUnavailableError, match="exited with code"):
        srv.start()
    assert srv.process.poll() is not None  # nothing left running
    srv.close()
