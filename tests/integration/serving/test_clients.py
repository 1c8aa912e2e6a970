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
