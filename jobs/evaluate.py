"""Stage `eval`: held-out evaluation of the base and every post-trained model, as one Ray task.

- perplexity on the corpus' held-out packed shards, for every model;
- instruction loss (answer tokens only) on held-out instruction pairs, for every model;
- reward-model accuracy on held-out preference pairs (overall and per kind of rejected answer);
- for every model: answers to held-out prompts (sampled at the temperature the policies were
  trained with, the same seed for each; from transformers' `generate` in the task, or with
  `vllm:` set from a vLLM engine per model on Ray Data LLM, which then also gives the reward
  and judge models' scores of them), measured the way a reader sees them
  (`jobs/text_quality.py`): degeneration (distinct-1/2, repeated 4-grams, answers that end in
  a loop) and an independent judge, ROUGE-L and chrF against the held-out reference answer;
  two of them are kept as samples;
- for the policies (SFT, DPO, GRPO): the same answers scored by the reward model (mean score,
  and win rate against the baseline answer to the same prompt, ties counting half), and the
  mean log-probability margin of chosen over rejected answers. The reward model is the one
  the policies were optimized against, so these figures can rise while the answers get worse;
- for every model: the win rate against the baseline's answers under the `judge` stage's
  reward model (`judge_stage`), trained on the pairs of the other half of the documents: a
  judge the policies were not optimized against;
- an lm-evaluation-harness score for every model: `simple_evaluate` on the task files this
  stage writes to `lm_eval/` (default: `aero_heldout_prefs`, held-out preference pairs as
  two-way multiple choice, acc and length-normalized acc_norm);
- a reward-hacking guard: each model after the baseline whose judge, judge win rate or
  distinct-2 is below the baseline's (or whose loop share is above it) gets a warning in
  `eval.json`, `eval.md` and the stage's manifest, saying whether its training reward rose
  meanwhile.
Results: `eval.json` and `eval.md`. The task files in `lm_eval/` also score any exported
model offline from the command line:
`lm_eval --model hf --model_args pretrained=MODEL --include_path RUN/eval/lm_eval --tasks aero_heldout`.
Hand-written scoring because these metrics need our chat template and reward model on
pairs; lm-evaluation-harness covers the generic perplexity/multiple-choice part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from cluster.config import StrictModel
from cluster.manifest import atomic_write_text
from cluster.records import read_jsonl
from cluster.stage import Stage, StageContext, StageResult, is_folder_ref
from jobs.policy_sampling import Messages, answer_logprob, end_of_turn, reward_input_ids, reward_score, sample_answers
from jobs.vllm_batch import BatchEngine, context_length, rows_dataset, vllm_processor


class EvalConfig(StrictModel):
    models: list[str] = Field(default=["pretrain", "sft", "dpo", "grpo"], description="stages whose models are scored")
    policies: list[str] = Field(default=["sft", "dpo", "grpo"], description="models whose answers the reward model scores")
    baseline: str = Field(default="sft", description="win rates are against this policy")
    reward_stage: str = "reward"
    judge_stage: str | None = Field(default=None, description="a reward model trained on data disjoint from "
                                    "reward_stage's (the `judge` stage): the independent win rate; none: off")
    lm_eval_tasks: list[Literal["aero_heldout_prefs", "aero_heldout_ppl"]] = Field(
        default=["aero_heldout_prefs"], description="lm-eval tasks of lm_eval/ scored for every model ([]: off)")
    lm_eval_limit: int = Field(default=200, ge=1, description="documents per lm-eval task")
    ppl_sequences: int = Field(default=64, ge=1)
    records: int = Field(default=256, ge=1, description="held-out instruction / preference records scored (at most)")
    prompts: int = Field(default=32, ge=1, description="held-out prompts answered by each model")
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=0.7, ge=0, description="sampling temperature of the answers; 0 = greedy")
    samples_per_prompt: int = Field(default=2, ge=1, description="answers per prompt and model (same seed for each model)")
    seed: int = 0
    cpus: float = Field(default=1.0, gt=0, description="CPUs of the evaluation task")
    vllm: BatchEngine | None = Field(default=None, description="the answers come from Ray Data LLM, a vLLM engine per "
                                     "model with these settings, and the reward and judge models score them on a vLLM "
                                     "engine each; none: transformers in the evaluation task "
                                     "(on a small CPU machine, each engine's start costs more than a few hundred "
                                     "short answers)")


# The training reward each post-training stage logs (metrics.jsonl), for the reward-hacking guard.
TRAINING_REWARD = {"dpo": "rewards/margins", "grpo": "reward"}


def _perplexity(model, index: dict, n: int) -> float:
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    from jobs.compression_eval import perplexity

    table = pads.dataset(index["splits"]["val"]["path"], format="parquet").head(n, columns=["input_ids"])
    ids = torch.from_numpy(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype("int64"))
    return perplexity(model, ids)


def reward_trend(history: list[dict], key: str) -> tuple[float, float] | None:
    """A training reward's mean over the first and the last quarter of its logged steps."""
    import statistics

    values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
    if len(values) < 2:
        return None
    k = max(1, len(values) // 4)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def hacking_warnings(quality: dict[str, dict[str, float]], order: list[str], baseline: str,
                     trends: dict[str, tuple[float, float] | None]) -> list[str]:
    """A warning for each model after the baseline whose answers read worse than the baseline's
    by the independent judge or by degeneration; it says when its training reward rose meanwhile."""
    base = quality.get(baseline)
    if base is None or baseline not in order:
        return []
    warnings = []
    for name in order[order.index(baseline) + 1:]:
        q = quality.get(name)
        if q is None:
            continue
        worse = [f"{k} {q[k]:.3f} < {base[k]:.3f}" for k in ("rouge_l", "chrf", "distinct_2") if q[k] < base[k]]
        if q.get("judge_win_rate", 0.5) < 0.5:
            worse.append(f"judge win rate {q['judge_win_rate']:.3f} < 0.5")
        if q["loop_share"] > base["loop_share"]:
            worse.append(f"loop_share {q['loop_share']:.3f} > {base['loop_share']:.3f}")
        if not worse:
            continue
        trend = trends.get(name)
        rose = f"its training reward rose {trend[0]:.3f} -> {trend[1]:.3f} while " if trend and trend[1] > trend[0] else ""
        warnings.append(f"{name}: {rose}its answers read worse than {baseline}'s: {', '.join(worse)}"
                        + (" (reward hacking?)" if rose else ""))
    return warnings


def lm_eval_scores(model, tokenizer, tasks: list[str], folder: str, limit: int) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness's own `simple_evaluate` on an in-memory model, offline."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=folder),
                                  limit=limit, log_samples=False, verbosity="ERROR")
    return {task: {k.split(",")[0]: v for k, v in figures.items() if k.endswith(",none") and "stderr" not in k}
            for task, figures in out["results"].items()}


def _win_rate(own: list[float], base: list[float]) -> float:
    import statistics

    return statistics.fmean(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(own, base))


def _accuracy(rm, rm_tok, pairs: list[dict]) -> tuple[float, dict[str, float], int]:
    correct: dict[str, list[bool]] = {}
    for r in pairs:
        ok = reward_score(rm, rm_tok, r["prompt"], r["chosen"][0]["content"]) > reward_score(rm, rm_tok, r["prompt"], r["rejected"][0]["content"])
        correct.setdefault(r.get("rejected_kind", "user"), []).append(ok)
    every = [x for v in correct.values() for x in v]
    return sum(every) / len(every), {k: sum(v) / len(v) for k, v in sorted(correct.items())}, len(every)


def vllm_answers(cfg: EvalConfig, model_dir: str, prompts: list[Messages]) -> list[str]:
    """`sample_answers`' answers (prompt-major, `samples_per_prompt` each, seed + k for the k-th
    answer to a prompt, so two models differ only by their weights) from one vLLM engine on Ray
    Data LLM, from the driver."""
    from transformers import AutoTokenizer

    assert cfg.vllm is not None
    samples = cfg.samples_per_prompt
    stops = [t for t in end_of_turn(AutoTokenizer.from_pretrained(model_dir)) if t is not None]
    sampling = {"max_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": 1.0,
                "stop_token_ids": stops}
    rows = [{"i": i * samples + k, "messages": p, "seed": cfg.seed + k} for i, p in enumerate(prompts) for k in range(samples)]

    def pre(row: dict) -> dict:
        return {"i": row["i"], "messages": row["messages"],
                "sampling_params": {**sampling, **({"seed": row["seed"]} if cfg.temperature > 0 else {})}}

    def post(row: dict) -> dict:
        return {"i": row["i"], "text": row["generated_text"], "__inference_error__": ""}

    processor = vllm_processor(cfg.vllm, Path(model_dir), chat=True, preprocess=pre, postprocess=post)
    return [r["text"] for r in sorted(_take_all(processor, rows, cfg.vllm.batch_size, model_dir), key=lambda r: r["i"])]


def _take_all(processor, rows: list[dict], batch_size: int, what: str) -> list[dict]:
    out = processor(rows_dataset(rows, batch_size)).take_all()
    failed = [r["__inference_error__"] for r in out if r.get("__inference_error__")]
    if failed or len(out) != len(rows):
        raise RuntimeError(f"eval: vLLM took {len(out) - len(failed)} of {len(rows)} rows of {what}: {failed[:1]}")
    return out


def vllm_scores(cfg: EvalConfig, reward_dir: str, asked: list[Messages], answers: dict[str, list[str]]) -> dict[str, list[float]]:
    """`reward_score` for every model's answers (`asked[k]` answered by `answers[model][k]`):
    the reward model's raw output on the same tokens, from one vLLM pooling engine on Ray Data LLM."""
    from transformers import AutoTokenizer

    assert cfg.vllm is not None
    tok = AutoTokenizer.from_pretrained(reward_dir)
    context = context_length(reward_dir)
    rows = [{"who": name, "k": k, "ids": reward_input_ids(tok, p, a, context)}
            for name, texts in answers.items() for k, (p, a) in enumerate(zip(asked, texts))]

    def pre(row: dict) -> dict:
        return {"who": row["who"], "k": row["k"], "tokenized_prompt": row["ids"],
                "pooling_params": {"use_activation": False}}  # the raw score, as the reward model's head gives it

    def post(row: dict) -> dict:
        import numpy as np

        return {"who": row["who"], "k": row["k"], "score": float(np.asarray(row["embeddings"]).reshape(-1)[0]),
                "__inference_error__": ""}

    processor = vllm_processor(cfg.vllm, Path(reward_dir), chat=False, preprocess=pre, postprocess=post, task="classify")
    out = _take_all(processor, rows, cfg.vllm.batch_size, reward_dir)
    scores: dict[str, list[float]] = {name: [0.0] * len(texts) for name, texts in answers.items()}
    for r in out:
        scores[r["who"]][r["k"]] = r["score"]
    return scores


def evaluate(cfg: EvalConfig, models: dict[str, str], reward_model: str, index: dict, data: dict[str, str],
             trends: dict[str, tuple[float, float] | None] | None = None, judge_model: str | None = None,
             lm_eval_dir: str | None = None, answered: dict[str, list[str]] | None = None,
             scored: dict[str, dict[str, list[float]]] | None = None) -> dict[str, Any]:
    """Every figure of eval.json; runs inside one Ray task. `answered`: each model's answers,
    made beforehand (`vllm_answers`), and `scored`: their scores by the "reward" and "judge"
    models (`vllm_scores`); else they are sampled and scored here."""
    import statistics

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jobs.awq_loader import load_causal_lm
    from jobs.text_quality import degeneration, judge

    torch.manual_seed(0)
    answered, scored = answered or {}, scored or {}
    sft_val = read_jsonl(Path(data["sft_val"]), cfg.records)
    prefs_val = read_jsonl(Path(data["prefs_val"]), cfg.records)
    asked_records = read_jsonl(Path(data["sft_val"]), cfg.prompts)
    prompts = [r["prompt"] for r in asked_records]
    references = [r["completion"][0]["content"] for r in asked_records for _ in range(cfg.samples_per_prompt)]
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    rm_tok = AutoTokenizer.from_pretrained(reward_model)
    result: dict[str, Any] = {"ppl": {}, "instruction_loss": {}, "mean_reward": {}, "logprob_margin": {},
                              "win_rate": {}, "judge_win_rate": {}, "lm_eval": {}, "quality": {}, "samples": {}}
    result["reward_accuracy"], result["reward_accuracy_by_kind"], result["reward_pairs"] = _accuracy(rm, rm_tok, prefs_val)
    judge_rm = None
    if judge_model:
        judge_rm = (AutoModelForSequenceClassification.from_pretrained(judge_model).eval(),
                    AutoTokenizer.from_pretrained(judge_model))
        result["judge_accuracy"] = _accuracy(*judge_rm, prefs_val)[0]

    scores: dict[str, list[float]] = {}
    judged: dict[str, list[float]] = {}
    for name, path in models.items():
        model = load_causal_lm(path)
        tok = AutoTokenizer.from_pretrained(path)
        result["ppl"][name] = _perplexity(model, index, cfg.ppl_sequences)
        total, count = 0.0, 0
        for r in sft_val:
            lp, n = answer_logprob(model, tok, r["prompt"], r["completion"][0]["content"])
            total, count = total - lp, count + n
        result["instruction_loss"][name] = total / max(count, 1)
        if cfg.lm_eval_tasks and lm_eval_dir:
            result["lm_eval"][name] = lm_eval_scores(model, tok, cfg.lm_eval_tasks, lm_eval_dir, cfg.lm_eval_limit)
        answers = answered.get(name) or sample_answers(
            model, tok, prompts, samples=cfg.samples_per_prompt, temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        asked = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        result["quality"][name] = {**degeneration(answers), **judge(answers, references)}
        every_prompt = slice(None, None, cfg.samples_per_prompt)  # two different prompts, not two answers to one
        result["samples"][name] = [{"prompt": p[-1]["content"][:200], "answer": a[:300]}
                                   for p, a in list(zip(asked[every_prompt], answers[every_prompt]))[:2]]
        if name in cfg.policies:
            margins = [answer_logprob(model, tok, r["prompt"], r["chosen"][0]["content"])[0]
                       - answer_logprob(model, tok, r["prompt"], r["rejected"][0]["content"])[0] for r in prefs_val]
            result["logprob_margin"][name] = statistics.fmean(margins)
            scores[name] = scored.get("reward", {}).get(name) or [reward_score(rm, rm_tok, p, a) for p, a in zip(asked, answers)]
            result["mean_reward"][name] = statistics.fmean(scores[name])
        if judge_rm is not None:  # every model, the served copy too
            judged[name] = scored.get("judge", {}).get(name) or [reward_score(*judge_rm, p, a) for p, a in zip(asked, answers)]
    for figure, by_model in (("win_rate", scores), ("judge_win_rate", judged)):
        base = by_model.get(cfg.baseline)
        for name, own in by_model.items():
            if name != cfg.baseline and base is not None:
                result[figure][name] = _win_rate(own, base)
    for name, rate in result["judge_win_rate"].items():
        result["quality"][name]["judge_win_rate"] = rate
    for name in ("dpo", "grpo"):
        if name in result["win_rate"]:
            result[f"{name}_win_rate"] = result["win_rate"][name]
    trends = trends or {}
    result["training_reward"] = {k: {"first": v[0], "last": v[1]} for k, v in trends.items() if v}
    result["warnings"] = hacking_warnings(result["quality"], list(models), cfg.baseline, trends)
    result["prompts"] = len(prompts)
    result["answers_per_policy"] = len(prompts) * cfg.samples_per_prompt
    result["sampling"] = {"temperature": cfg.temperature, "seed": cfg.seed, "max_new_tokens": cfg.max_new_tokens,
                          "engine": "vllm (Ray Data LLM)" if answered else "transformers",
                          "scored_by": "vllm (Ray Data LLM)" if scored else "transformers"}
    return result


def write_lm_eval_tasks(folder: Path, documents_dir: Path, prefs_val: Path, tokenizer_dir: str, limit: int = 200) -> Path:
    """Task files for lm-evaluation-harness over our held-out split (absolute data paths, offline)."""
    import pyarrow.dataset as pads
    import yaml
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    table = pads.dataset(str(documents_dir), format="parquet").to_table(columns=["text", "split"])
    docs = [{"text": t[:4000]} for t, s in zip(table.column("text").to_pylist(), table.column("split").to_pylist()) if s == "val"]
    atomic_write_text(folder / "heldout_docs.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs[:limit]))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prefs = []
    for r in read_jsonl(prefs_val, limit):
        prefix = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        prefs.append({"context": prefix, "chosen": r["chosen"][0]["content"] + "<|im_end|>",
                      "rejected": r["rejected"][0]["content"] + "<|im_end|>"})
    atomic_write_text(folder / "heldout_prefs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prefs))
    tasks = {
        "aero_heldout_ppl": {
            "task": "aero_heldout_ppl", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((folder / "heldout_docs.jsonl").resolve())}},
            "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        },
        "aero_heldout_prefs": {
            "task": "aero_heldout_prefs", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((folder / "heldout_prefs.jsonl").resolve())}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{context}}",
            "target_delimiter": "", "doc_to_choice": "{{[chosen, rejected]}}", "doc_to_target": 0,
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
        },
    }
    for name, task in tasks.items():
        atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(task, sort_keys=False))
    atomic_write_text(folder / "aero_heldout.yaml",
                      yaml.safe_dump({"group": "aero_heldout", "task": list(tasks)}, sort_keys=False))
    return folder


QUALITY_COLUMNS = ("rouge_l", "chrf", "distinct_1", "distinct_2", "repeated_4gram_share", "loop_share")


def _lm_eval_cells(result: dict[str, Any], model: str) -> str:
    figures = result.get("lm_eval", {}).get(model, {})
    return ", ".join(f"{k} {v:.3f}" for task in figures.values() for k, v in task.items() if isinstance(v, float))


def _table(result: dict[str, Any]) -> str:
    models = list(result["ppl"])
    quality = result.get("quality", {})
    lines = ["| model | held-out ppl | instruction loss | ROUGE-L | chrF | distinct-1 | distinct-2 | repeated 4-grams "
             "| ends in a loop | judge win rate | lm-eval | mean reward* | win rate vs baseline* "
             "| chosen-rejected logp margin |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        cells = [f"{result['ppl'][m]:.2f}", f"{result['instruction_loss'][m]:.3f}"]
        cells += [f"{quality[m][k]:.3f}" if m in quality else "" for k in QUALITY_COLUMNS]
        cells += [f"{result['judge_win_rate'][m]:.3f}" if m in result.get("judge_win_rate", {}) else "",
                  _lm_eval_cells(result, m)]
        cells += [f"{result[k][m]:.3f}" if m in result[k] else "" for k in ("mean_reward", "win_rate", "logprob_margin")]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    by_kind = ", ".join(f"{k} {v:.2f}" for k, v in result["reward_accuracy_by_kind"].items())
    judge = (f" The judge reward model (trained on the other half of the pairs): **{result['judge_accuracy']:.3f}**."
             if "judge_accuracy" in result else "")
    lines += ["", "ROUGE-L and chrF: the answers against the held-out reference answers; judge win rate: against "
              "the baseline's answers under a reward model trained on other data than the policies' (both "
              "independent judges). lm-eval: lm-evaluation-harness on the held-out task files (`lm_eval/`). "
              "\\* judged by the reward model the policies were optimized against.",
              "", f"Reward-model accuracy on {result['reward_pairs']} held-out pairs: "
              f"**{result['reward_accuracy']:.3f}** ({by_kind}).{judge}"]
    for w in result.get("warnings", []):
        lines += ["", f"**Warning — {w}**"]
    for m, samples in result.get("samples", {}).items():
        lines += ["", f"Answers of `{m}`:"]
        for s in samples:
            answer = " ".join(s["answer"].split()) or "(empty)"
            lines.append(f"- *{' '.join(s['prompt'].split())[:120]}* → {answer[:240]}")
    return "\n".join(lines) + "\n"


def run(ctx: StageContext, cfg: EvalConfig) -> StageResult:
    import ray

    models = {name: str(ctx.model_dir(name).resolve()) for name in cfg.models}
    reward_model = str(ctx.model_dir(cfg.reward_stage).resolve())
    index = json.loads(ctx.upstream_output("tokenizer", "index").read_text())
    data = {k: str(ctx.upstream_output("chat_data", k).resolve()) for k in ("sft_val", "prefs_val")}
    trends = {}
    for name in cfg.models:
        if name in TRAINING_REWARD and not is_folder_ref(name):
            trends[name] = reward_trend(read_jsonl(ctx.upstream_output(name, "metrics")), TRAINING_REWARD[name])
    judge_model = str(ctx.model_dir(cfg.judge_stage).resolve()) if cfg.judge_stage else None
    tasks = write_lm_eval_tasks(ctx.stage_dir / "lm_eval", ctx.upstream_output("data", "documents"),
                                Path(data["prefs_val"]), index["tokenizer"])
    answered = scored = None
    if cfg.vllm is not None:  # answers and their scores from vLLM engines, before the evaluation task
        prompts = [r["prompt"] for r in read_jsonl(Path(data["sft_val"]), cfg.prompts)]
        answered = {name: vllm_answers(cfg, path, prompts) for name, path in models.items()}
        asked = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
        scored = {"reward": vllm_scores(cfg, reward_model, asked, {n: a for n, a in answered.items() if n in cfg.policies})}
        if judge_model:
            scored["judge"] = vllm_scores(cfg, judge_model, asked, answered)
    task = ray.remote(num_cpus=cfg.cpus)(evaluate)
    result = ray.get(task.remote(cfg, models, reward_model, index, data, trends, judge_model, str(tasks.resolve()),
                                 answered, scored))
    atomic_write_text(ctx.stage_dir / "eval.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(ctx.stage_dir / "eval.md", _table(result))
    metrics = {k: v for k, v in result.items() if isinstance(v, float)}
    metrics.update({f"{k}_{m}": q[k] for m, q in result["quality"].items()
                    for k in ("rouge_l", "distinct_2", "judge_win_rate") if k in q})
    metrics.update({f"lm_eval_{task}_{k}_{m}": v for m, by_task in result["lm_eval"].items()
                    for task, figures in by_task.items() for k, v in figures.items() if k == "acc_norm"})
    if result["warnings"]:
        metrics["warnings"] = result["warnings"]
    return StageResult(outputs={"eval": ctx.stage_dir / "eval.json", "table": ctx.stage_dir / "eval.md",
                                "lm_eval_tasks": tasks}, metrics=metrics)


def _upstream(ctx: StageContext, cfg: EvalConfig) -> dict[str, str]:
    return ctx.fingerprints(sorted({*cfg.models, cfg.reward_stage, *([cfg.judge_stage] if cfg.judge_stage else [])}))


STAGE = Stage(name="eval", config_model=EvalConfig, run=run, needs=("data", "tokenizer", "chat_data"),
              outside_inputs=_upstream, description="held-out evaluation of every model; lm-eval task files")
