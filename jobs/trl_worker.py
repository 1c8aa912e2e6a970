"""The per-worker function of the post-training stages: one TRL trainer (SFT, reward, DPO or
GRPO) under Ray Train's TorchTrainer.

Ray Train starts the workers and the process group; TRL/transformers (through accelerate)
see the distributed environment and run DDP over gloo on CPU or DeepSpeed on GPU. A callback
reports metrics and the trainer's checkpoint to Ray (rank 0's copy only: the trainer saves on
the main process); a restarted worker group resumes from Ray's latest checkpoint. The trainer also saves at
its last step, and the driver exports that checkpoint (LoRA merged) with the tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jobs.posttrain_config import (
    DPOConfig,
    GRPOConfig,
    PostTrainConfig,
    RewardConfig,
    SFTConfig,
    common_args,
)

CONFIGS: dict[str, type[PostTrainConfig]] = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "grpo": GRPOConfig}


def _report_callback(log_path: str | None):
    import ray.train
    from transformers import TrainerCallback

    class ReportToRay(TrainerCallback):
        """Per-log metrics to metrics.jsonl (rank 0); at each save, metrics + checkpoint to Ray."""

        def on_train_begin(self, args, state, control, **kwargs):
            if log_path and state.is_world_process_zero:  # a resumed run begins at its checkpoint's step
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"event": "train_begin", "step": state.global_step}) + "\n")

        def on_log(self, args, state, control, logs=None, **kwargs):
            if log_path and state.is_world_process_zero and logs:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

        def on_save(self, args, state, control, **kwargs):
            metrics: dict[str, Any] = {}
            for entry in state.log_history:
                metrics.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
            metrics["step"] = state.global_step  # log entries carry their own, older "step"
            source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and source.is_dir():
                with tempfile.TemporaryDirectory() as tmp:
                    shutil.copytree(source, Path(tmp) / "checkpoint")
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            else:
                ray.train.report(metrics, checkpoint=None)

    return ReportToRay()


def _peft_config(cfg: PostTrainConfig, task_type: str):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type=task_type,
                      modules_to_save=["score"] if task_type == "SEQ_CLS" else None)


def build_trainer(kind: str, cfg: PostTrainConfig, paths: dict[str, str], output_dir: str, callbacks: list):
    """The TRL trainer of `kind`, on the base model and datasets named in `paths`."""
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["base"])
    max_length = int(paths["max_length"])
    keep = {"sft": ["prompt", "completion"], "reward": ["prompt", "chosen", "rejected"],
            "dpo": ["prompt", "chosen", "rejected"], "grpo": ["prompt"]}[kind]
    # Loaded one by one: the two files may carry different extra columns (sampled DPO pairs).
    train, evaluation = (load_dataset("json", data_files=paths[split], split="train").select_columns(keep)
                         for split in ("train", "eval"))
    evaluation = evaluation.select(range(min(cfg.eval_records, len(evaluation))))
    dtype = torch.bfloat16 if cfg.scaling.use_gpu else torch.float32
    args = common_args(cfg, output_dir, max_length)
    common = dict(train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer, callbacks=callbacks)

    if kind == "sft":
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype)
        return trl.SFTTrainer(model=model, args=trl.SFTConfig(**args, max_length=max_length),
                              peft_config=_peft_config(cfg, "CAUSAL_LM"), **common)
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(paths["base"], num_labels=1, dtype=dtype)
        model.config.pad_token_id = tokenizer.pad_token_id
        return trl.RewardTrainer(model=model, args=trl.RewardConfig(**args, max_length=max_length),
                                 peft_config=_peft_config(cfg, "SEQ_CLS"), **common)
    if kind == "dpo":
        assert isinstance(cfg, DPOConfig)
        model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype)
        losses, weights = ([cfg.loss_type, "sft"], [1.0, cfg.sft_weight]) if cfg.sft_weight else ([cfg.loss_type], None)
        return trl.DPOTrainer(model=model, args=trl.DPOConfig(**args, max_length=max_length, beta=cfg.beta,
                                                              loss_type=losses, loss_weights=weights),
                              peft_config=_peft_config(cfg, "CAUSAL_LM"), **common)
    assert isinstance(cfg, GRPOConfig)
    from jobs.rewards import RULE_REWARDS

    reward_model = AutoModelForSequenceClassification.from_pretrained(paths["reward_model"], num_labels=1, dtype=dtype)
    reward_tokenizer = AutoTokenizer.from_pretrained(paths["reward_model"])
    funcs, weights, classes = [reward_model], [cfg.reward_model_weight], [reward_tokenizer]
    for name, weight in cfg.rule_rewards.items():
        funcs.append(RULE_REWARDS[name])
        weights.append(weight)
        classes.append(None)
    if cfg.repetition_penalty:
        from trl.rewards import get_repetition_penalty_reward

        funcs.append(get_repetition_penalty_reward(ngram_size=3, max_penalty=-1.0))  # over completion token ids
        weights.append(cfg.repetition_penalty)
        classes.append(None)
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype)
    grpo_args = trl.GRPOConfig(
        **args, num_generations=cfg.num_generations, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, beta=cfg.beta, reward_weights=weights,
        generation_kwargs={"eos_token_id": [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]},
    )
    common.pop("eval_dataset")
    return trl.GRPOTrainer(model=model, reward_funcs=funcs, args=grpo_args, reward_processing_classes=classes,
                           peft_config=_peft_config(cfg, "CAUSAL_LM"), **common)


def export_checkpoint(kind: str, checkpoint: Path, base: str, out: Path) -> Path:
    """A trainer checkpoint -> a Hugging Face model folder (LoRA merged into `base`), with the
    tokenizer and a generation config that stops at the end of an assistant turn."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    if (checkpoint / "adapter_config.json").exists():
        from peft import PeftModel

        extra = {"num_labels": 1} if kind == "reward" else {}
        model = PeftModel.from_pretrained(auto.from_pretrained(base, **extra), str(checkpoint)).merge_and_unload()
    else:
        model = auto.from_pretrained(str(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(base)
    if kind != "reward":
        model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def trl_train_loop(loop_config: dict[str, Any]) -> None:
    """The function Ray Train's TorchTrainer runs on every worker."""
    import ray.train
    import torch

    kind = loop_config["kind"]
    cfg = CONFIGS[kind].model_validate(loop_config["config"])
    paths = loop_config["paths"]
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.threads_per_worker)
    rank = ray.train.get_context().get_world_rank()
    output_dir = paths["work_dir"]
    trainer = build_trainer(kind, cfg, paths, output_dir, [_report_callback(paths["log"] if rank == 0 else None)])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.train()
    else:
        with checkpoint.as_directory() as d:
            trainer.train(resume_from_checkpoint=os.path.join(d, "checkpoint"))
