"""chat_data's reading task (a passage in the Q&A page's prompt shape, answered by its first
sentence), the held-out Q&A items it leaves for the serve stage's check, and the disjoint halves
of preference pairs the reward and judge models learn from."""

from __future__ import annotations

import json

import pytest

from cluster.errors import UserError
from data_jobs.chat_data import READ_PROMPT, ChatDataConfig, corpus_pairs, numbered, prose_pairs, reading_topics
from jobs.posttrain import half_of
from serve.demo_check import contains_span, load_qa_items
from serve.prompt_templates import load_template

DOC = """The "pass" statement
********************

The pass statement is a null operation: when it is executed, nothing happens.  It is
useful as a placeholder when a statement is required syntactically.

pass_stmt ::= "pass"

Placeholders in classes
=======================

An empty class body may hold a single pass statement so that the class still parses.
Nothing else is needed.

object.__placeholder__(self)

   Called when the interpreter needs a statement and has none to run.  It returns None.
"""


def test_sections_and_definitions_become_reading_topics():
    topics = dict(reading_topics([p for p in DOC.split("\n\n") if p.strip()]))
    assert topics["Placeholders in classes"][0].startswith("An empty class body")
    assert topics["object.__placeholder__(self)"][0].startswith("Called when the interpreter")  # dedented


def test_a_reading_item_asks_about_its_topic_and_answers_with_the_passages_first_sentence():
    reads = [p for p in prose_pairs(DOC, ChatDataConfig()) if p["task"] == "read"]
    assert len(reads) == 3
    for r in reads:
        passage = r["prompt"].split("[1] ", 1)[1]
        sentence = r["answer"].removesuffix(" [1]")
        assert r["answer"].endswith(" [1]") and sentence in passage
        assert r["key_span"] == " ".join(sentence.split()[:8])
        assert r["prompt"].startswith('Passages:\n[1] The "pass" statement: ') and r["prompt"].endswith(r["question"])
    first = next(r for r in reads if "pass" in r["question"])
    assert first["answer"].startswith("The pass statement is a null operation")


def test_a_grammar_rule_or_a_short_line_is_never_a_reference_answer():
    text = "Expression lists\n****************\n\nexpr_list ::= expression (\",\" expression)* [\",\"] more rules here\n\nShort.\n"
    assert not [p for p in prose_pairs(text, ChatDataConfig()) if p["task"] == "read"]


def test_held_out_documents_give_all_their_reading_items_to_qa_val_and_training_ones_none():
    docs = [{"doc_id": f"d{i}", "kind": "prose", "text": DOC.replace("pass", f"pass{i}"), "split": split}
            for i, split in enumerate(["train", "train", "val"])]
    out = corpus_pairs(docs, ChatDataConfig(reads_per_document=1))
    assert {r["doc_id"] for r in out["qa_val"]} == {"d2"} and len(out["qa_val"]) == 3
    assert all(set(r) == {"question", "reference", "key_span", "doc_id"} for r in out["qa_val"])
    assert sum(r["task"] == "read" for r in out["sft_train"]) == 2  # capped at one per training document


def test_the_reading_task_has_the_shape_of_the_qa_v2_template():
    listed = numbered([("T", "P"), ("U", "Q")])  # how POST /v1/qa lists the retrieved passages
    assert listed == ["[1] T: P", "[2] U: Q"]  # the reading task's `[1] title: passage`
    template = load_template("qa.v2", needs={"question", "passages"})
    messages = template.messages(question="Q?", passages=listed[0])
    assert messages == [{"role": "user", "content": READ_PROMPT.format(passages="[1] T: P", question="Q?")}]


def test_preference_halves_are_disjoint_by_document_and_both_used():
    records = [{"doc_id": f"doc{i}", "task": "explain", "prompt": [{"role": "user", "content": f"p{i}-{j}"}]}
               for i in range(40) for j in range(3)]
    halves = {}
    for r in records:
        halves.setdefault(r["doc_id"], set()).add(half_of(r))
    assert all(len(h) == 1 for h in halves.values())  # every pair of a document in the same half
    assert {"first_half", "second_half"} == {h for hs in halves.values() for h in hs}
    user = [{"doc_id": "mine.jsonl", "task": "user", "prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(40)]
    assert {half_of(r) for r in user} == {"first_half", "second_half"}  # one user file is split by prompt


def test_qa_check_items_need_a_question_and_a_key_span(tmp_path):
    good = tmp_path / "qa.jsonl"
    good.write_text(json.dumps({"question": "What is pass?", "key_span": "a null operation"}) + "\n")
    assert load_qa_items(good, 5)[0]["question"] == "What is pass?"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "What is pass?"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*key_span"):
        load_qa_items(bad, 5)
    assert contains_span("It is  a NULL\noperation [1].", "a null operation")
    assert not contains_span("It does nothing.", "a null operation")


def test_a_fragment_of_the_answer_is_a_rejected_answer():
    docs = [{"doc_id": f"d{i}", "kind": "prose", "split": "train", "text": DOC.replace("pass", f"pass{i}")} for i in range(2)]
    prefs = corpus_pairs(docs, ChatDataConfig())["prefs_train"]
    fragments = [p for p in prefs if p["rejected_kind"] == "fragment"]
    assert fragments
    for p in fragments:
        rejected, chosen = p["rejected"][0]["content"], p["chosen"][0]["content"]
        assert 2 <= len(rejected.split()) <= 3 and chosen.endswith(rejected)
