"""Post-training on a real local Ray: chat data from the corpus, real TRL trainers (SFT, reward,
DPO, GRPO) under Ray Train with 2 CPU workers (DDP over gloo), evaluation, lm-eval tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from cluster.config import build_recipe
from cluster.errors import ConfigError, UserError
from cluster.manifest import read_manifest
from cluster.runner import run_stage
from jobs.text_quality import degenerate
from tests.conftest import BASE, recipe


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.slow
def test_chat_data_pairs_come_from_the_corpus_split_by_document(post_run):
    folder = post_run / "chat_data"
    train, val = _jsonl(folder / "sft_train.jsonl"), _jsonl(folder / "sft_val.jsonl")
    assert len(train) >= 20 and len(val) >= 4
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in val}
    assert {"complete_function", "explain"} <= {r["task"] for r in train}
    prefs = _jsonl(folder / "prefs_train.jsonl")
    assert {r["rejected_kind"] for r in prefs} == {"wrong_topic", "shuffled", "truncated", "fragment"}
    assert all(r["chosen"][0]["content"] != r["rejected"][0]["content"] for r in prefs)
    kinds_per_answer: dict[str, set] = {}
    for r in prefs:
        kinds_per_answer.setdefault(r["chosen"][0]["content"], set()).add(r["rejected_kind"])
    # Every answer is paired with every kind of rejected answer that applies to it (a short
    # answer cannot be shuffled, cut or reduced to a fragment), so most answers have all four.
    assert sum(len(k) == 4 for k in kinds_per_answer.values()) > len(kinds_per_answer) / 2
    fragments = [r["rejected"][0]["content"] for r in prefs if r["rejected_kind"] == "fragment"]
    assert all(2 <= len(f.split()) <= 3 for f in fragments)
    function = next(r for r in train if r["task"] == "complete_function")
    assert function["prompt"][0]["content"].startswith("Complete this Python function:\ndef ")
    read = next(r for r in train if r["task"] == "read")  # a passage in the Q&A prompt's shape
    assert read["prompt"][0]["content"].startswith("Passages:\n[1] ") and read["completion"][0]["content"].endswith(" [1]")
    qa_val = _jsonl(folder / "qa_val.jsonl")  # held-out reading items for the serve stage's check
    assert qa_val and {r["doc_id"] for r in qa_val} <= {r["doc_id"] for r in val}


@pytest.mark.slow
def test_the_reward_and_judge_models_learn_from_disjoint_halves_of_the_pairs(post_run):
    every = _jsonl(post_run / "chat_data" / "prefs_train.jsonl")
    reward, judge = _jsonl(post_run / "reward" / "prefs_train.jsonl"), _jsonl(post_run / "judge" / "prefs_train.jsonl")
    assert reward and judge and len(reward) + len(judge) == len(every)
    assert not {r["doc_id"] for r in reward} & {r["doc_id"] for r in judge}
    assert read_manifest(post_run / "judge").config["pairs"] == "second_half"


@pytest.mark.slow
def test_the_chat_template_round_trips_and_every_model_carries_it(post_run):
    from transformers import AutoTokenizer

    tokenizer_dir = json.loads((post_run / "tokenizer/index.json").read_text())["tokenizer"]
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Xin chào! What is a dict?"},
                {"role": "assistant", "content": "A mapping of keys to values."}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    for stage in ("sft", "reward", "dpo", "grpo"):
        assert AutoTokenizer.from_pretrained(post_run / stage / "model").chat_template == tok.chat_template


@pytest.mark.slow
def test_every_trainer_exports_a_loadable_model(post_run):
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    for stage in ("sft", "dpo", "grpo"):
        manifest = read_manifest(post_run / stage)
        assert manifest.status == "finished" and manifest.metrics["step"] == BASE[stage]["steps"]
        folder = post_run / stage / "model"
        assert not (folder / "adapter_config.json").exists()  # LoRA (grpo) merged on export
        model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        prompt = tok.apply_chat_template([{"role": "user", "content": "Explain the for statement."}],
                                         tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape[1] > ids.shape[1]
        assert (post_run / stage / "curve.png").stat().st_size > 1000
    rm = AutoModelForSequenceClassification.from_pretrained(post_run / "reward/model")
    assert rm.config.num_labels == 1 and torch.isfinite(rm(input_ids=ids).logits).all()
    grpo_log = _jsonl(post_run / "grpo/metrics.jsonl")
    assert any("rewards/no_repetition/mean" in h for h in grpo_log)  # the rule reward took part
    assert any("rewards/repetition_penalty_reward/mean" in h for h in grpo_log)  # and TRL's repetition penalty


@pytest.mark.slow
def test_eval_shows_sft_learned_the_task_reward_beats_chance_and_dpo_widens_the_margin(post_run):
    result = json.loads((post_run / "eval/eval.json").read_text())
    assert result["instruction_loss"]["sft"] < result["instruction_loss"]["pretrain"]
    assert result["reward_accuracy"] > 0.5 and result["reward_pairs"] >= 10
    assert result["logprob_margin"]["dpo"] > result["logprob_margin"]["sft"]
    assert set(result["win_rate"]) == {"dpo", "grpo"} and all(0 <= v <= 1 for v in result["win_rate"].values())
    assert set(result["ppl"]) == {"pretrain", "sft", "dpo", "grpo", "quantize"}
    table = (post_run / "eval/eval.md").read_text()
    assert "| sft |" in table and "ROUGE-L" in table and "judge win rate" in table


@pytest.mark.slow
def test_eval_scores_win_rates_under_an_independent_judge_and_every_model_with_lm_eval(post_run):
    result = json.loads((post_run / "eval/eval.json").read_text())
    assert 0 <= result["judge_accuracy"] <= 1
    assert set(result["judge_win_rate"]) == {"pretrain", "dpo", "grpo", "quantize"}  # every model but the baseline
    assert all(0 <= v <= 1 for v in result["judge_win_rate"].values())
    for name in ("pretrain", "sft", "dpo", "grpo", "quantize"):  # lm-evaluation-harness ran on each model
        figures = result["lm_eval"][name]["aero_heldout_prefs"]
        assert 0 <= figures["acc"] <= 1 and 0 <= figures["acc_norm"] <= 1
    manifest = read_manifest(post_run / "eval")
    assert manifest.metrics["judge_win_rate_dpo"] == result["judge_win_rate"]["dpo"]
    assert manifest.metrics["lm_eval_aero_heldout_prefs_acc_norm_sft"] == result["lm_eval"]["sft"]["aero_heldout_prefs"]["acc_norm"]


@pytest.mark.slow
def test_eval_judges_every_models_answers_independently_and_warns_when_they_read_worse(post_run):
    result = json.loads((post_run / "eval/eval.json").read_text())
    manifest = read_manifest(post_run / "eval")
    for name in ("pretrain", "sft", "dpo", "grpo", "quantize"):  # quantize: the AWQ copy of a model, as served
        q = result["quality"][name]
        assert 0 <= q["rouge_l"] <= 1 and 0 <= q["chrf"] <= 100 and 0 < q["distinct_2"] <= 1
        assert 0 <= q["repeated_4gram_share"] <= 1 and 0 <= q["loop_share"] <= 1
        assert len(result["samples"][name]) == 2 and all(s["prompt"] for s in result["samples"][name])
        assert f"Answers of `{name}`" in (post_run / "eval/eval.md").read_text()
    assert set(result["training_reward"]) == {"dpo", "grpo"}
    sft = result["quality"]["sft"]
    for name in ("dpo", "grpo"):  # no model reads worse than SFT by the judge without its warning
        q = result["quality"][name]
        worse = q["rouge_l"] < sft["rouge_l"] or q["chrf"] < sft["chrf"] or q["distinct_2"] < sft["distinct_2"] \
            or q["loop_share"] > sft["loop_share"] or q["judge_win_rate"] < 0.5
        assert worse == any(w.startswith(f"{name}:") for w in result["warnings"]), (name, q, sft, result["warnings"])
    assert manifest.metrics.get("warnings", []) == result["warnings"]


@pytest.mark.slow
def test_lm_eval_scores_an_exported_model_on_the_held_out_split_offline(post_run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf",
           "--model_args", f"pretrained={post_run / 'sft/model'},dtype=float32", "--device", "cpu",
           "--include_path", str(post_run / "eval/lm_eval"), "--tasks", "aero_heldout", "--limit", "6",
           "--batch_size", "4", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["aero_heldout_prefs"]["acc,none"] <= 1
    assert 1 < results["aero_heldout_ppl"]["word_perplexity,none"] < float("inf")


def test_malformed_user_records_are_reported_and_the_good_ones_kept(post_run, tmp_path):
    good = {"prompt": "What is a list?", "chosen": "An ordered, mutable sequence.", "rejected": "A kind of fish."}
    rows = [
        json.dumps(good),
        json.dumps({"prompt": "Where is chosen?", "rejected": "here"}),
        json.dumps({"prompt": [], "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "q"}],
                    "chosen": "a", "rejected": "b"}),
        json.dumps({"prompt": "word " * 400, "chosen": "a", "rejected": "b"}),
        "{broken json",
        json.dumps({**good, "prompt": "What is a tuple?"}),
    ]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(rows) + "\n")
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
                   + "\n" + json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    runs = post_run.parent
    target = runs / "userdata"
    for stage in ("data", "tokenizer"):
        if not (target / stage).exists():
            import shutil

            shutil.copytree(post_run / stage, target / stage)
    r = recipe(runs, "userdata", chat_data={**BASE["chat_data"], "preference_files": [str(prefs)], "sft_files": [str(sft)]})
    manifest = run_stage(r, "chat_data")
    problems = {(Path(p["source"]).name, p["index"]): p["reason"] for p in _jsonl(target / "chat_data/problems.jsonl")}
    assert problems[("prefs.jsonl", 1)] == "missing `chosen`"
    assert "non-empty" in problems[("prefs.jsonl", 2)]
    assert "wrong role order" in problems[("prefs.jsonl", 3)]
    assert "exceed the context of 128 tokens" in problems[("prefs.jsonl", 4)]
    assert "not JSON" in problems[("prefs.jsonl", 5)]
    assert "must end with an assistant turn" in problems[("sft.jsonl", 1)]
    assert len(problems) == 6 and manifest.metrics["rejected_records"] == 6
    user = [r for split in ("train", "val") for r in _jsonl(target / f"chat_data/prefs_{split}.jsonl") if r["task"] == "user"]
    assert sorted(r["prompt"][0]["content"] for r in user) == ["What is a list?", "What is a tuple?"]

    with pytest.raises(UserError, match=r"only \d+ valid sft_train records \(chat_data.min_records is 100000\)"):
        run_stage(recipe(runs, "userdata", chat_data={**BASE["chat_data"], "min_records": 100000}), "chat_data")


def test_post_training_configs_are_checked_before_workers_start(post_run):
    with pytest.raises(ConfigError, match="not divisible by num_generations 3"):
        build_recipe({"run": "x", "grpo": {"micro_batch": 4, "num_generations": 3}})
    with pytest.raises(ConfigError, match="rule_rewards"):
        build_recipe({"run": "x", "grpo": {"rule_rewards": {"made_up": 1.0}}})
    import shutil

    runs = post_run.parent  # a run of its own: a failed stage of "post" would be wiped and lost
    for stage in ("data", "tokenizer", "pretrain", "chat_data"):
        shutil.copytree(post_run / stage, runs / "postcfg" / stage)
    with pytest.raises(UserError, match="max_length 4096 is longer than the base model's context of 128"):
        run_stage(recipe(runs, "postcfg", sft={**BASE["sft"], "max_length": 4096}), "sft")
    with pytest.raises(UserError, match="is not a Hugging Face model folder"):
        run_stage(recipe(runs, "postcfg", dpo={**BASE["dpo"], "base": str(runs)}), "dpo")


def test_the_gpu_deepspeed_config_is_accepted_by_transformers(post_run, tmp_path):
    """What a GPU worker would hand TRL: transformers fills the "auto" fields from the trainer's
    arguments and rejects contradictions; checked here without a GPU."""
    import trl
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from jobs.posttrain_config import DPOConfig, common_args
    from jobs.training_config import deepspeed_config

    for zero in (2, 3):
        cfg = DPOConfig.model_validate({"zero_stage": zero, "offload_optimizer": True, "scaling": {"use_gpu": True}})
        args = trl.DPOConfig(**{**common_args(cfg, str(tmp_path), 128), "use_cpu": True, "bf16": False, "deepspeed": None})
        ds = HfTrainerDeepSpeedConfig(deepspeed_config(cfg, for_hf_trainer=True))
        ds.trainer_config_process(args)
        filled = ds.config
        assert filled["train_micro_batch_size_per_gpu"] == cfg.micro_batch
        assert filled["gradient_accumulation_steps"] == cfg.grad_accum and filled["gradient_clipping"] == 1.0
        assert filled["zero_optimization"]["stage"] == zero and ds.is_zero3() == (zero == 3)
        assert filled["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.slow
def test_a_killed_trl_worker_is_restarted_from_the_last_checkpoint(post_run):
    import shutil

    import psutil

    target = post_run.parent / "sftkill"
    for stage in ("data", "tokenizer", "pretrain", "chat_data"):
        shutil.copytree(post_run / stage, target / stage)
    r = recipe(post_run.parent, "sftkill", sft={**BASE["sft"], "steps": 30, "checkpoint_every": 6})
    results: dict = {}
    thread = threading.Thread(target=lambda: results.setdefault("manifest", run_stage(r, "sft")))
    thread.start()
    # Kill a worker once Ray Train's controller has registered a checkpoint (a report still
    # queued in a worker that dies never reaches the controller).
    snapshot = target / "sft/ray_results/sft/checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (snapshot.exists() and "checkpoint_" in snapshot.read_text()):
        time.sleep(0.2)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no Ray Train worker process found to kill"
    workers[-1].kill()
    thread.join(timeout=600)
    manifest = results["manifest"]
    assert manifest.status == "finished" and manifest.metrics["step"] == 30
    starts = [h["step"] for h in _jsonl(target / "sft/metrics.jsonl") if h.get("event") == "train_begin"]
    assert len(starts) == 2 and starts[0] == 0 and starts[1] >= 6 and starts[1] % 6 == 0, starts


@pytest.mark.slow
def test_dpo_on_sampled_pairs_trains_on_the_policys_answers_ranked_by_the_reward_model(post_run):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jobs.policy_sampling import answer_logprob

    runs = post_run.parent
    for stage in ("data", "tokenizer", "pretrain", "chat_data", "sft", "reward"):
        shutil.copytree(post_run / stage, runs / "dposampled" / stage)
    sampled = {"reward_stage": "reward", "samples": 2, "max_new_tokens": 16, "prompts": 16}
    dpo = {**BASE["dpo"], "steps": 8, "checkpoint_every": 8, "sampled_pairs": sampled}
    with pytest.raises(UserError, match="needs stage 'nosuch'"):
        run_stage(recipe(runs, "dposampled", dpo={**dpo, "sampled_pairs": {**sampled, "reward_stage": "nosuch"}}), "dpo")
    manifest = run_stage(recipe(runs, "dposampled", dpo=dpo), "dpo")
    stage = runs / "dposampled" / "dpo"
    pairs, stats = _jsonl(stage / "pairs_train.jsonl"), manifest.metrics["sampled_pairs"]
    prompts = {json.dumps(r["prompt"]) for r in _jsonl(post_run / "chat_data/sft_train.jsonl")}
    assert stats["prompts"] == 16 and stats["pairs"] == len(pairs) >= 8
    assert stats["pairs"] + stats["too_close"] + stats["all_answers_loop"] == 16
    for p in pairs:  # the policy's own answers to training prompts, the reward model's pick first, never a loop
        assert json.dumps(p["prompt"]) in prompts and p["chosen"] != p["rejected"]
        assert not degenerate(p["chosen"][0]["content"])
        assert p["chosen_score"] > p["rejected_score"]
    assert "model:" not in json.dumps(manifest.inputs) and "stage:reward" in manifest.inputs
    # DPO widened the margin of the pairs it trained on.
    tok = AutoTokenizer.from_pretrained(post_run / "sft/model")

    def margin(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        return sum(answer_logprob(model, tok, p["prompt"], p["chosen"][0]["content"])[0]
                   - answer_logprob(model, tok, p["prompt"], p["rejected"][0]["content"])[0] for p in pairs) / len(pairs)

    assert margin(stage / "model") > margin(post_run / "sft/model")


@pytest.mark.slow
def test_tune_searches_a_trl_stage_field(post_run):
    """Ray Tune over DPO's beta and learning rate, each trial the stage's TRL trainer in one process."""
    import pandas as pd

    tune = {"stage": "dpo", "metric": "eval_loss", "searcher": "random", "scheduler": {"type": "fifo"},
            "space": {"beta": {"choice": [0.05, 0.3]}, "lr": {"loguniform": [1e-4, 1e-3]}},
            "trial": {"steps": 4, "eval_every": 2, "eval_records": 8, "checkpoint_every": 4}, "num_samples": 2}
    manifest = run_stage(recipe(post_run.parent, "post", tune=tune), "tune")
    trials = pd.read_csv(post_run / "tune/trials.csv")
    assert len(trials) == 2 and set(trials["status"]) == {"finished"} and set(trials["steps"]) == {4}
    assert trials["eval_loss"].notna().all() and manifest.metrics["trial_steps"] == 8
    best = yaml.safe_load((post_run / "tune/best.yaml").read_text())
    assert set(best["dpo"]) == {"beta", "lr"} and best["dpo"]["beta"] in (0.05, 0.3)



def test_the_rayservice_entry_point_finds_the_models_of_the_finished_run(post_run, tmp_path, monkeypatch):
    """`serve.app:recipe_app_builder`, which `aero cluster k8s`'s RayService deploys, reads the
    recipe on the cluster and resolves its models from the run folder."""
    from ray.serve import Application

    from serve.app import recipe_app_builder

    section = {"models": [{"name": "sft", "source": "sft"}, {"name": "aero", "source": "quantize"}],
               "qa": {"index": "qa_index"}}
    monkeypatch.setenv("AERO_API_KEYS", "k8s-key")  # the RayService's pods read it from a Secret
    found = tmp_path / "found.yaml"
    found.write_text(yaml.safe_dump({"run": post_run.name, "runs_dir": str(post_run.parent), "serve": section}))
    assert isinstance(recipe_app_builder({"recipe": str(found)}), Application)
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"run": post_run.name, "runs_dir": str(tmp_path / "empty"), "serve": section}))
    with pytest.raises(UserError, match="stage 'serve' needs stage 'sft' of run 'post', which has not run"):
        recipe_app_builder({"recipe": str(missing)})
