"""parse_qa_pairs on a table of replies real teachers produce: what is kept, and that every
dropped item is counted with its reason."""

from __future__ import annotations

import json

import pytest

from aios_fast.evolve.parsing import QA_SCHEMA, REJECTION_KINDS, count_reasons, parse_qa_pairs

GOOD = [("What is a zorblat?", "A fictional blue metal."), ("Where is zorblat mined?", "On the moon Io.")]
GOOD_JSON = json.dumps([{"question": q, "answer": a} for q, a in GOOD])

# (id, reply, expected pairs, expected {kind: count} of the reasons)
CASES = [
    ("plain-list", GOOD_JSON, GOOD, {}),
    ("code-fence", f"```json\n{GOOD_JSON}\n```", GOOD, {}),
    ("fence-and-prose", f"Sure! Here you go:\n```\n{GOOD_JSON}\n```\nLet me know if you need more [1].", GOOD, {}),
    ("trailing-prose", GOOD_JSON + "\n\nThese questions cover the passage well.", GOOD, {}),
    ("single-object", '{"question": "What is a zorblat?", "answer": "A fictional blue metal."}', GOOD[:1], {}),
    ("wrapped-pairs", json.dumps({"pairs": [{"question": q, "answer": a} for q, a in GOOD]}), GOOD, {}),
    ("wrapped-questions", json.dumps({"questions": [{"q": q, "a": a} for q, a in GOOD]}), GOOD, {}),
    ("alternate-keys", json.dumps([{"Prompt": GOOD[0][0], "Response": GOOD[0][1]},
                                   {"INPUT": GOOD[1][0], "output": GOOD[1][1]}]), GOOD, {}),
    ("json-lines", "\n".join(json.dumps({"question": q, "answer": a}) for q, a in GOOD), GOOD, {}),
    ("python-literal", "[{'question': 'What is a zorblat?', 'answer': 'A fictional blue metal.',}]", GOOD[:1], {}),
    ("mapping", json.dumps(dict(GOOD)), GOOD, {}),
    ("two-lists", json.dumps([list(p) for p in GOOD]), GOOD, {}),
    ("qa-lines", "Q: What is a zorblat?\nA: A fictional\nblue metal.\n\nQuestion 2: Where is zorblat mined?\n"
                 "Answer 2: On the moon Io.", GOOD, {}),
    ("numbered-questions", "Here are two questions:\n1. What is a zorblat?\n   Answer: A fictional blue metal.\n"
                           "2. **Where is zorblat mined?**\nAnswer: On the moon Io.", GOOD, {}),
    ("truncated", GOOD_JSON[:-20], GOOD[:1], {"invalid_json": 1}),
    ("missing-fields", json.dumps([{"question": GOOD[0][0]}, {"answer": "x"}, {"text": "y"}, GOOD[1]]),
     [GOOD[1]], {"missing_answer": 1, "missing_question": 2}),
    ("empty-and-placeholder", json.dumps([{"question": "What is a zorblat?", "answer": ""},
                                          {"question": "Where is zorblat mined?", "answer": "..."},
                                          {"question": "<question>", "answer": "Blue."},
                                          {"question": "Who found it?", "answer": "N/A"}]),
     [], {"empty": 1, "placeholder": 3}),
    ("duplicates", json.dumps([{"question": q, "answer": a} for q, a in GOOD + GOOD[:1]]
                              + [{"question": "what is a  ZORBLAT", "answer": "another"}]),
     GOOD, {"duplicate": 2}),
    ("wrong-types", json.dumps([{"question": ["a", "list"], "answer": "x"}, {"question": "How heavy is it?",
                                "answer": {"kg": 3}}, {"question": "How many moons?", "answer": 3}, 7, "text"]),
     [("How many moons?", "3")], {"not_text": 2, "not_a_pair": 2}),
    ("answer-repeats", json.dumps({"question": "What is a zorblat?", "answer": "what is a zorblat"}), [],
     {"answer_repeats_question": 1}),
    ("too-short-too-long", json.dumps([{"question": "Why", "answer": "Because."},
                                       {"question": "Long answer?", "answer": "x " * 1500}]),
     [], {"too_short": 1, "too_long": 1}),
    ("refusal-prose", "I'm sorry, but I can't help with that request.", [], {"no_pairs_found": 1}),
    ("broken-json", '{"question": "What is a zorblat?" "answer": oops', [], {"invalid_json": 1}),
    ("empty", "   \n ", [], {"empty_reply": 1}),
    ("not-a-string", None, [], {"empty_reply": 1}),
    ("json-residue", '{"pairs": [{"question": "What is the ferry?}, {", "answer": "A boat."}]}', [],
     {"json_residue": 1}),
    ("prefixed-values", json.dumps({"question": "Q: What is a zorblat?", "answer": "A: A fictional blue metal."}),
     GOOD[:1], {}),
]


@pytest.mark.parametrize("reply, expected, kinds", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_parse_table(reply, expected, kinds):
    check_parsed(parse_qa_pairs(reply), expected, kinds)


def check_parsed(result, expected, kinds):
    """``result`` (what a parse function returned) keeps ``expected`` and drops the rest for the
    reasons counted in ``kinds``, every reason of a known kind."""
    kept, reasons = result
    assert kept == expected
    assert count_reasons(reasons) == kinds
    assert all(r.split(":", 1)[0] in REJECTION_KINDS for r in reasons), reasons


def test_reasons_name_the_item_and_field():
    _, reasons = parse_qa_pairs(json.dumps([{"question": "What is it?", "answer": "Blue."}, {"foo": 1}]))
    assert reasons == ["missing_question: item 2 has no question field (fields: ['foo'])"]


def test_max_pairs_and_limits():
    reply = json.dumps([{"question": f"What is item number {i}?", "answer": f"Item {i}."} for i in range(5)])
    pairs, reasons = parse_qa_pairs(reply, max_pairs=3)
    assert len(pairs) == 3 and count_reasons(reasons) == {"over_limit": 2}
    pairs, reasons = parse_qa_pairs("x" * 50, max_reply_chars=10)
    assert pairs == [] and count_reasons(reasons) == {"reply_too_long": 1}


def test_pathological_input_is_bounded():
    # deeply nested / bracket-heavy garbage must neither crash nor produce pairs
    for reply in ["[" * 5000, "{" * 5000 + "}" * 5000, "[{" * 3000, "{'a': " * 2000]:
        pairs, reasons = parse_qa_pairs(reply)
        assert pairs == [] and len(reasons) >= 1


def test_schema_accepts_its_own_shape():
    reply = json.dumps({"pairs": [{"question": q, "answer": a} for q, a in GOOD]})
    assert QA_SCHEMA["required"] == ["pairs"]
    assert parse_qa_pairs(reply)[0] == GOOD


QUESTION_CASES = [
    ("numbered-lines", "Here are questions:\n1. What's the current status of the ferry?\n2. **How many people are "
                       "on board?**\nI hope these help.", ["What's the current status of the ferry?",
                                                          "How many people are on board?"], {}),
    ("json-list", json.dumps(["When does the ferry leave?", "...", "When does the ferry leave?", 7]),
     ["When does the ferry leave?"], {"placeholder": 1, "duplicate": 1, "not_text": 1}),
    ("wrapped", json.dumps({"questions": ["Is the bike free?", {"q": "Where is pier 3?"}, {"x": 1}]}),
     ["Is the bike free?", "Where is pier 3?"], {"missing_question": 1}),
    ("q-prefix", "Q: Who sells tickets?\nA: The kiosk.\nQ: Why?", ["Who sells tickets?"], {"too_short": 1}),
    ("prose", "The ferry is nice.", [], {"no_questions_found": 1}),
]


@pytest.mark.parametrize("reply, expected, kinds", [pytest.param(*c[1:], id=c[0]) for c in QUESTION_CASES])
def test_parse_questions(reply, expected, kinds):
    from aios_fast.evolve.parsing import parse_questions

    check_parsed(parse_questions(reply), expected, kinds)
