"""Real clients against the served app, as users point them at `vllm serve`: the official
`openai` client on what vLLM's API adds (token-id and batched prompts, seeds, structured
output, streamed usage), and lm-evaluation-harness's `local-completions` (a loglikelihood and a
generate_until task) and `local-chat-completions`, which must produce scores."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.integration.serving.conftest import KEY

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a list?"}]


def _client(gateway):
    from openai import OpenAI

    return OpenAI(base_url=f"{gateway['base']}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.mark.slow
def test_completions_take_every_prompt_form_vllm_takes(gateway):
    from transformers import AutoTokenizer

    client = _client(gateway)
    tok = AutoTokenizer.from_pretrained(gateway["model_dir"])
    text = "The list type is"
    ids = tok(text)["input_ids"]
    by_text = client.completions.create(model="sft", prompt=text, max_tokens=8, temperature=0)
    by_ids = client.completions.create(model="sft", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    batch = client.completions.create(model="sft", prompt=[text, "A dict maps"], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == by_text.choices[0].text
    id_batch = client.completions.create(model="sft", prompt=[ids, ids], max_tokens=8, temperature=0)
    assert [c.text for c in id_batch.choices] == [by_text.choices[0].text] * 2

    # echo + logprobs: a top_logprobs entry for every prompt token but the first (what lm-eval reads)
    echoed = client.completions.create(model="sft", prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    lp = echoed.choices[0].logprobs
    assert len(lp.top_logprobs) == len(ids) + 1 and lp.top_logprobs[0] is None
    assert all(isinstance(t, dict) and t for t in lp.top_logprobs[1:])


@pytest.mark.slow
def test_seeds_stops_streamed_usage_and_structured_output(gateway):
    client = _client(gateway)
    seeded = [client.chat.completions.create(model="sft", messages=MESSAGES, max_tokens=12, temperature=1.0, seed=3,
                                             n=2).choices for _ in range(2)]
    assert [c.message.content for c in seeded[0]] == [c.message.content for c in seeded[1]]

    usage = [c.usage for c in client.completions.create(model="sft", prompt="Lists", max_tokens=6, temperature=0,
                                                          stream=True, stream_options={"include_usage": True}) if c.usage]
    assert len(usage) == 1 and usage[0].completion_tokens == 6

    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="sft", messages=MESSAGES, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "yes_no", "schema": schema}})
    assert json.loads(reply.choices[0].message.content)["answer"] in ("yes", "no")


def _generate_task(folder) -> str:
    """A generate_until task of our own (lm-eval's are downloaded; nothing is here)."""
    rows = [{"question": q, "answer": a} for q, a in [("2 + 2", "4"), ("Capital of France", "Paris"),
                                                       ("Opposite of up", "down"), ("A list in Python", "[]")]]
    (folder / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"task": "aero_generate", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / "qa.jsonl")}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}]}
    (folder / "aero_generate.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return "aero_generate"


@pytest.mark.slow
def test_lm_eval_api_models_score_the_served_model(gateway, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    generate = _generate_task(tmp_path)
    tasks = TaskManager(include_path=[str(tmp_path), str(gateway["lm_eval_tasks"])])
    common = f"model=sft,num_concurrent=2,max_retries=1,tokenizer_backend=huggingface,tokenizer={gateway['model_dir']}"
    out = lm_eval.simple_evaluate(
        model="local-completions", model_args=f"{common},base_url={gateway['base']}/v1/completions,max_length=128",
        tasks=["aero_heldout_prefs", generate], task_manager=tasks, limit=8)
    prefs, gen = out["results"]["aero_heldout_prefs"], out["results"][generate]
    assert 0 <= prefs["acc,none"] <= 1 and 0 <= gen["exact_match,none"] <= 1
    assert out["n-samples"][generate]["effective"] == 4 and out["n-samples"]["aero_heldout_prefs"]["effective"] == 8
    chat = lm_eval.simple_evaluate(
        model="local-chat-completions", model_args=f"{common},base_url={gateway['base']}/v1/chat/completions",
        tasks=[generate], task_manager=tasks, limit=4, apply_chat_template=True)
    assert 0 <= chat["results"][generate]["exact_match,none"] <= 1


@pytest.mark.slow
def test_batch_generation_over_the_corpus_through_the_served_endpoint(gateway, post_run, tmp_path, monkeypatch):
    """The generate stage over the data stage's documents, against an OpenAI-compatible upstream
    (Ray Data LLM's HTTP processor): here the served app itself, with its key; the moderation
    stage's classifier marks the outputs."""
    import shutil

    import pyarrow.dataset as pads

    from cluster.runner import run_stage
    from tests.conftest import recipe

    monkeypatch.setenv("AERO_TEST_GEN_KEY", KEY)
    shutil.copytree(post_run / "data", tmp_path / "gen" / "data")  # a run of its own over the trained run's corpus
    tpl = tmp_path / "q.j2"
    tpl.write_text("Passage: {{ text[:120] }}\nAsk one question about it.\nQuestion:")  # a 128-token context
    section = {"input": "data", "template": str(tpl), "upstream": f"{gateway['base']}/v1", "upstream_model": "sft",
               "api_key_env": "AERO_TEST_GEN_KEY", "sampling": {"max_tokens": 8}, "batch_size": 2, "max_rows": 6,
               "moderation": {"enabled": True, "classifier": str(post_run / "moderation" / "classifier")}}
    manifest = run_stage(recipe(tmp_path, "gen", stages=["generate"], generate=section), "generate")
    rows = pads.dataset(str(tmp_path / "gen" / "generate" / "generated"), format="parquet").to_table().to_pylist()
    assert manifest.metrics["rows_generated"] == len(rows) == 6 and manifest.metrics["rows_rejected"] == 0
    docs = {d["doc_id"]: d["text"] for d in pads.dataset(str(post_run / "data" / "documents")).to_table().to_pylist()}
    for r in rows:
        assert r["__id__"] in docs and docs[r["__id__"]][:40] in json.loads(r["prompt"])[-1]["content"]  # its passage
        assert r["generated_text"] and 0 < r["num_generated_tokens"] <= 8 and r["finish_reason"] in ("stop", "length")
        assert r["num_input_tokens"] > 0 and isinstance(r["flagged"], bool)
        assert json.loads(r["sampling"])["max_tokens"] == 8
    assert manifest.metrics["rows_per_s"] > 0
