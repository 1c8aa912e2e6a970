"""Batch generation on Ray Data LLM with vLLM, on the session's Ray and the trained run's tiny
model (no mocked engine): a one-off `aero generate` killed mid-run and rerun, with malformed
rows. The data stage's documents through the served endpoint, with moderation on the outputs:
tests/integration/serving/test_clients.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import AERO, REPO, aero

TEMPLATE = "Passage: {{ text[:300] }}\nWrite one question a reader could ask about this passage.\nQuestion:"


def _table(folder):
    import pyarrow.dataset as pads

    return pads.dataset(str(folder), format="parquet").to_table().to_pylist() if folder.exists() else []


@pytest.mark.slow
def test_a_killed_run_resumes_without_duplicates_and_rejects_add_up(post_run, tmp_path):
    tpl = tmp_path / "question.j2"
    tpl.write_text(TEMPLATE)
    rows = [{"text": f"Topic {i}: lists, dicts and sets hold items; item {i} is the one asked about."} for i in range(120)]
    lines = [json.dumps(r) for r in rows] + ['{"text": "broken', json.dumps({"title": "no text field"})]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["generate", "--model", str(post_run / "sft" / "model"), "--input", str(data), "--template", str(tpl),
            "--run", "gen", "--runs-dir", str(tmp_path), "shard_rows=4", "batch_size=4", "sampling.max_tokens=32",
            "sampling.frequency_penalty=1.0"]
    gen, rej = tmp_path / "gen" / "generate" / "generated", tmp_path / "gen" / "generate" / "rejects"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen([*AERO, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (gen.exists() and list(gen.glob("*.parquet"))) and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = len(_table(gen))
    assert 0 < before < 120, f"{before} rows were written before the kill"
    assert len(_table(rej)) == 2  # both bad rows, before any inference

    rerun = aero(*args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:] + rerun.stdout[-2000:]
    assert "120 rows generated, 2 rejected (of 122)" in rerun.stdout, rerun.stdout
    done = _table(gen)
    ids = [r["__id__"] for r in done]
    assert len(ids) == len(set(ids)) == 120  # nothing twice, nothing lost
    reasons = sorted(r["reason"] for r in _table(rej))
    assert len(reasons) == 2 and "rows.jsonl:121: not a JSON line" in reasons[0]
    assert "template field missing: 'text'" in reasons[1]
    assert "done earlier" in rerun.stdout and f"{before + 2} done earlier" in rerun.stdout


@pytest.mark.slow
def test_eval_takes_its_answers_from_vllm_on_ray_data_llm(post_run, tmp_path):
    """`eval.vllm`: each model's answers, and the reward model's scores of them, come from vLLM
    engines on Ray Data LLM; at temperature 0 and in float32 they are what transformers'
    greedy decoding and the reward model's forward pass give."""
    import shutil

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cluster.records import read_jsonl
    from cluster.runner import run_stage
    from jobs.awq_loader import load_causal_lm
    from jobs.policy_sampling import reward_score, sample_answers
    from tests.conftest import recipe

    prompts = [r["prompt"] for r in read_jsonl(post_run / "chat_data" / "sft_val.jsonl", 6)]

    def greedy(name: str) -> list[str]:
        model_dir = post_run / name / "model"
        return sample_answers(load_causal_lm(str(model_dir)), AutoTokenizer.from_pretrained(model_dir), prompts,
                              samples=1, temperature=0, max_new_tokens=16, seed=0)

    # The most telling policy: one whose greedy answers have words that differ by prompt (a
    # barely trained one may answer every prompt with blank lines), else DPO's.
    answers = {name: greedy(name) for name in ("dpo", "grpo", "sft")}
    name = next((n for n, a in answers.items() if all(x.split() for x in a[:2]) and a[0] != a[1]), "dpo")
    expected = answers[name]
    for stage in ("data", "tokenizer", "chat_data", name, "reward"):
        shutil.copytree(post_run / stage, tmp_path / "evalvllm" / stage)
    settings = {"models": [name], "policies": [name], "baseline": name, "lm_eval_tasks": [], "prompts": 6,
                "samples_per_prompt": 1, "temperature": 0, "max_new_tokens": 16, "records": 8, "ppl_sequences": 4,
                "vllm": {"engine_kwargs": {"dtype": "float32"}}}
    manifest = run_stage(recipe(tmp_path, "evalvllm", eval=settings), "eval")
    assert manifest.status == "finished"
    result = json.loads((tmp_path / "evalvllm" / "eval" / "eval.json").read_text())
    assert result["sampling"]["engine"] == result["sampling"]["scored_by"] == "vllm (Ray Data LLM)"
    assert result["answers_per_policy"] == 6
    assert 0 <= result["quality"][name]["distinct_2"] <= 1 and "rouge_l" in result["quality"][name]
    assert list(result["mean_reward"]) == [name]
    assert [s["answer"] for s in result["samples"][name]] == [e[:300] for e in expected[:2]], (name, expected)
    reward_dir = post_run / "reward" / "model"
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    scores = [reward_score(rm, AutoTokenizer.from_pretrained(reward_dir), p, a) for p, a in zip(prompts, expected)]
    assert len(set(scores)) > 1 and abs(result["mean_reward"][name] - sum(scores) / len(scores)) < 1e-3, scores
