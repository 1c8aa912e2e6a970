"""Stages `sft`, `reward`, `judge`, `dpo` and `grpo`: TRL trainers under Ray Train's TorchTrainer.

The driver checks the data and the base model, starts N workers (`jobs.trl_worker`), and
exports the final checkpoint that the workers reported to Ray (so it works when the workers
are on other nodes) as a Hugging Face model with the tokenizer. Each stage starts from the
model of the stage named in its `base` (or a model folder), SFT/reward from `pretrain` and
DPO/GRPO from `sft` by default; GRPO's reward is the `reward` stage's model plus rule rewards.
`judge` is a second reward model (TRL's RewardTrainer too), trained on the other half of the
preference pairs, for eval's independent win rate.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from cluster.errors import UserError
from cluster.manifest import atomic_write_text
from cluster.records import plot_curves, read_jsonl
from cluster.stage import Stage, StageContext, StageResult
from jobs.posttrain_config import DPOConfig, GRPOConfig, PostTrainConfig, RewardConfig, SFTConfig

DATASETS = {"sft": ("sft_train", "sft_val"), "reward": ("prefs_train", "prefs_val"),
            "dpo": ("prefs_train", "prefs_val"), "grpo": ("sft_train", "sft_val")}


def _model_sources(cfg: PostTrainConfig) -> dict[str, str]:
    sources = {"base": cfg.base}
    if isinstance(cfg, GRPOConfig):
        sources["reward_model"] = cfg.reward_stage
    if isinstance(cfg, DPOConfig) and cfg.sampled_pairs:
        sources["reward_model"] = cfg.sampled_pairs.reward_stage
    return sources


def upstream_inputs(ctx: StageContext, cfg: PostTrainConfig) -> dict[str, str]:
    """Fingerprints of the configurable upstream models, so a changed base reruns the stage."""
    return ctx.fingerprints(_model_sources(cfg).values())


def half_of(record: dict) -> str:
    """`first_half` or `second_half`: corpus pairs by their source document, so every pair of a
    document lands in the same half; user pairs (all with one file as doc_id) by their prompt."""
    import xxhash

    key = json.dumps(record["prompt"], sort_keys=True) if record.get("task") == "user" else str(record["doc_id"])
    return "first_half" if xxhash.xxh64_intdigest(key.encode()) % 2 == 0 else "second_half"


def _half_of_pairs(ctx: StageContext, cfg: RewardConfig, source: Path) -> Path:
    kept = [r for r in read_jsonl(source) if half_of(r) == cfg.pairs]
    target = ctx.stage_dir / "prefs_train.jsonl"
    atomic_write_text(target, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
    return target


def _prompts_with_room(records: list[dict], tokenizer, room: int) -> list[dict]:
    """Prompts (GRPO's, sampled DPO pairs') whose templated length leaves room for the answer."""
    keep = []
    for r in records:
        text = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= room:
            keep.append({"prompt": r["prompt"]})
    return keep


def _sample_pairs(ctx: StageContext, cfg: DPOConfig, base: Path, max_length: int) -> Path:
    """`pairs_train.jsonl` (+ `pairs.json`, its counts): the base policy's answers to the training
    prompts ranked by the reward model, made by one Ray task (a GPU one on GPU clusters)."""
    import ray
    from transformers import AutoTokenizer

    from jobs.policy_sampling import ranked_pairs

    sp = cfg.sampled_pairs
    assert sp is not None
    reward_model = ctx.model_dir(sp.reward_stage)
    source = ctx.upstream_output("chat_data", "sft_train")
    records = read_jsonl(source)
    prompts = _prompts_with_room(records, AutoTokenizer.from_pretrained(str(base)), max_length - sp.max_new_tokens)
    prompts = [p["prompt"] for p in prompts][:sp.prompts]
    if not prompts:
        raise UserError(f"dpo.sampled_pairs: no training prompt in {source} leaves room for "
                        f"max_new_tokens {sp.max_new_tokens} in {max_length} tokens")
    task = ray.remote(ranked_pairs).options(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=int(cfg.scaling.use_gpu))
    made = ray.get(task.remote(str(base), str(reward_model), prompts, samples=sp.samples, temperature=sp.temperature,
                               max_new_tokens=sp.max_new_tokens, min_gap=sp.min_gap, seed=cfg.seed,
                               threads=cfg.scaling.threads_per_worker))
    target = ctx.stage_dir / "pairs_train.jsonl"
    atomic_write_text(target, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in made["pairs"]))
    atomic_write_text(ctx.stage_dir / "pairs.json", json.dumps(made["stats"], indent=2) + "\n")
    return target


def prepare_paths(kind: str, ctx: StageContext, cfg: PostTrainConfig) -> dict[str, str]:
    """Everything the workers read, checked before any worker starts."""
    from transformers import AutoConfig, AutoTokenizer

    base = ctx.model_dir(cfg.base)
    context = AutoConfig.from_pretrained(str(base)).max_position_embeddings
    max_length = cfg.max_length or context
    if max_length > context:
        raise UserError(f"{kind}.max_length {max_length} is longer than the base model's context of {context} tokens")
    train_name, eval_name = DATASETS[kind]
    train, evaluation = ctx.upstream_output("chat_data", train_name), ctx.upstream_output("chat_data", eval_name)
    paths = {"base": str(base.resolve()), "max_length": str(max_length), "train": str(train.resolve()),
             "eval": str(evaluation.resolve())}
    if isinstance(cfg, GRPOConfig):
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        for split, source in (("train", train), ("eval", evaluation)):
            records = read_jsonl(source)
            prompts = _prompts_with_room(records, tokenizer, max_length - cfg.max_completion_length)
            target = ctx.stage_dir / f"prompts_{split}.jsonl"
            atomic_write_text(target, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))
            paths[split] = str(target.resolve())
        paths["reward_model"] = str(ctx.model_dir(cfg.reward_stage).resolve())
    if isinstance(cfg, DPOConfig) and cfg.sampled_pairs:
        paths["train"] = str(_sample_pairs(ctx, cfg, base, max_length).resolve())
    if isinstance(cfg, RewardConfig) and cfg.pairs != "all":
        paths["train"] = str(_half_of_pairs(ctx, cfg, train).resolve())
    rows = len(read_jsonl(Path(paths["train"])))
    needed = cfg.micro_batch * cfg.scaling.num_workers
    if rows < needed:
        raise UserError(f"{kind}: {rows} training records in {paths['train']}, fewer than one batch "
                        f"(micro_batch {cfg.micro_batch} x num_workers {cfg.scaling.num_workers})")
    paths.update(work_dir=str((ctx.stage_dir / "trainer").resolve()), log=str((ctx.stage_dir / "metrics.jsonl").resolve()))
    return paths


def _plot(history: list[dict], key: str, path: Path, title: str) -> None:
    points = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
    plot_curves({key: points}, path, ylabel=key, title=title)


PLOTTED = {"sft": "loss", "reward": "loss", "dpo": "loss", "grpo": "reward"}


def run(kind: str, ctx: StageContext, cfg: PostTrainConfig) -> StageResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from jobs.trl_worker import export_checkpoint, trl_train_loop

    paths = prepare_paths(kind, ctx, cfg)
    trainer = TorchTrainer(
        trl_train_loop,
        train_loop_config={"kind": kind, "config": cfg.model_dump(), "paths": paths},
        scaling_config=cfg.scaling.ray_scaling(),
        run_config=RunConfig(
            name=kind, storage_path=ctx.checkpoint_storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{kind} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        model = export_checkpoint(kind, Path(d) / "checkpoint", paths["base"], ctx.stage_dir / "model")
    history = read_jsonl(ctx.stage_dir / "metrics.jsonl")
    _plot(history, PLOTTED[kind], ctx.stage_dir / "curve.png", f"{kind}: {PLOTTED[kind]}")
    last = {k: v for h in history for k, v in h.items() if isinstance(v, (int, float))}
    summary = {"step": result.metrics.get("step"), **{k: last[k] for k in sorted(last) if k != "step"}}
    atomic_write_text(ctx.stage_dir / "train.json", json.dumps(summary, indent=2) + "\n")
    outputs = {"model": model, "metrics": ctx.stage_dir / "metrics.jsonl", "curve": ctx.stage_dir / "curve.png"}
    if isinstance(cfg, DPOConfig) and cfg.sampled_pairs:
        outputs.update(pairs=ctx.stage_dir / "pairs_train.jsonl", pairs_stats=ctx.stage_dir / "pairs.json")
        summary["sampled_pairs"] = json.loads((ctx.stage_dir / "pairs.json").read_text())
    return StageResult(outputs=outputs, metrics=summary)


def memory_needs(kind: str, recipe, cfg: PostTrainConfig) -> list:
    """The planner's figure for one worker (cluster/plan.py): the policy being trained, plus the
    frozen models it holds (DPO's reference; GRPO's reference and reward model)."""
    from jobs.memory_estimate import model_shape_for, training_needs

    shape = model_shape_for(recipe, cfg.base)
    if shape is None:
        return []
    frozen = 0
    if isinstance(cfg, DPOConfig) and not cfg.lora.enabled:
        frozen = 1  # the reference policy (with LoRA, TRL uses the base with the adapter off)
    if isinstance(cfg, GRPOConfig):
        frozen = 1 + (cfg.beta > 0 and not cfg.lora.enabled)
    if kind == "reward":  # a scalar head, no vocabulary logits
        from dataclasses import replace

        shape = replace(shape, vocab=1)
    return [training_needs(
        kind, shape, workers=cfg.scaling.num_workers, gpu=cfg.scaling.use_gpu,
        cpus_per_worker=cfg.scaling.cpus_per_worker, zero_stage=cfg.zero_stage if cfg.scaling.use_gpu else 0,
        batch=cfg.micro_batch, sequences_per_example=2 if kind in ("dpo", "reward") else 1,
        seq_len=cfg.max_length or shape.context, activation_checkpointing=cfg.activation_checkpointing,
        offload_optimizer=cfg.offload_optimizer, frozen_copies=frozen, trainable=not cfg.lora.enabled,
        role="TRL worker" + (" (LoRA)" if cfg.lora.enabled else ""),
    )]


def _stage(name: str, config_model: type[PostTrainConfig], description: str, kind: str | None = None) -> Stage:
    """`kind`: the TRL trainer (default: the stage's name)."""
    kind = kind or name
    return Stage(name=name, config_model=config_model, run=partial(run, kind), needs=("chat_data",),
                 outside_inputs=upstream_inputs, description=description, memory=partial(memory_needs, kind))


SFT = _stage("sft", SFTConfig, "supervised fine-tuning with TRL's SFTTrainer on Ray Train")
REWARD = _stage("reward", RewardConfig, "reward model with TRL's RewardTrainer on Ray Train")
JUDGE = _stage("judge", RewardConfig, "eval's independent reward model, on the other half of the pairs", kind="reward")
DPO = _stage("dpo", DPOConfig, "preference alignment with TRL's DPOTrainer on Ray Train")
GRPO = _stage("grpo", GRPOConfig, "GRPO with TRL's GRPOTrainer, rewarded by the reward model, on Ray Train")
