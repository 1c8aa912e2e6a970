"""Typed configs of the post-training stages (`sft`, `reward`, `dpo`, `grpo`) and the TRL
arguments built from them (one place, so the GPU DeepSpeed config can be checked by
transformers on a CPU machine)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.config import StrictModel
from jobs.training_config import TrainingConfig, deepspeed_config


class LoraConfig(StrictModel):
    enabled: bool = False
    r: int = Field(default=8, ge=1)
    alpha: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class PostTrainConfig(TrainingConfig):
    """What every post-training stage shares; `base` is the stage whose exported model it starts from."""

    base: str = "pretrain"
    lora: LoraConfig = LoraConfig()
    max_length: int | None = Field(default=None, ge=16, description="default: the model's context")
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO on GPU workers (CPU: plain DDP)")
    eval_every: int | None = Field(default=None, ge=1, description="steps between held-out evaluations (none: off)")
    eval_records: int = Field(default=64, ge=1, description="held-out records for the trainer's eval loss")


class SFTConfig(PostTrainConfig):
    base: str = "pretrain"


class RewardConfig(PostTrainConfig):
    """The `reward` stage's and the `judge` stage's config. With `pairs: first_half` on one and
    `second_half` on the other, the two reward models learn from the pairs of disjoint halves of
    the source documents, so the judge that eval asks never saw the data of the reward model the
    policies were optimized against."""

    base: str = "pretrain"
    lr: float = Field(default=1e-3, gt=0)
    pairs: Literal["all", "first_half", "second_half"] = Field(
        default="all", description="which training preference pairs: all, or those of one half of the source "
                                   "documents (by a hash of the document id; user pairs by their prompt)")


class SampledPairs(StrictModel):
    """DPO pairs from the base policy's own answers, ranked by a reward model (chosen = the
    best-scored of `samples` answers to a training prompt, rejected = the worst): DPO then
    optimizes what the reward model prefers among answers the policy can give, as GRPO does
    online. The corpus' pairs (right vs wrong-topic/shuffled/truncated text) are far from what
    the policy says: DPO on them widened their margin but did not move the reward of the
    policy's own answers (docs/results.md)."""

    reward_stage: str = "reward"
    samples: int = Field(default=4, ge=2, description="answers sampled per training prompt")
    temperature: float = Field(default=0.7, gt=0)
    max_new_tokens: int = Field(default=48, ge=1)
    min_gap: float = Field(default=0.0, ge=0, description="a pair needs a reward gap above this")
    prompts: int | None = Field(default=None, ge=1, description="training prompts used (none: all that fit)")


class DPOConfig(PostTrainConfig):
    base: str = "sft"
    sampled_pairs: SampledPairs | None = Field(
        default=None, description="train on the policy's own answers ranked by the reward model (none: chat_data's pairs)")
    beta: float = Field(default=0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    sft_weight: float = Field(default=0.0, ge=0, description="weight of an SFT loss on the chosen answers (RPO); "
                              "keeps the chosen answers likely while the margin grows")


class GRPOConfig(PostTrainConfig):
    base: str = "sft"
    reward_stage: str = "reward"
    reward_model_weight: float = Field(default=1.0, ge=0)
    repetition_penalty: float = Field(default=1.0, ge=0, description="weight of TRL's n-gram repetition penalty "
                                      "reward (trl.rewards.get_repetition_penalty_reward, 0 to -1 per completion), "
                                      "so that RL does not learn loops; 0: off")
    rule_rewards: dict[Literal["no_repetition", "ends_cleanly", "length"], float] = Field(
        default_factory=dict, description="extra rule rewards from jobs.rewards, name -> weight"
    )
    num_generations: int = Field(default=4, ge=2)
    max_completion_length: int = Field(default=48, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    beta: float = Field(default=0.04, ge=0)
    lr: float = Field(default=2e-4, gt=0)

    @model_validator(mode="after")
    def _generations_fit(self) -> "GRPOConfig":
        if self.global_batch and self.global_batch % self.num_generations:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by num_generations "
                f"{self.num_generations} (each prompt's completions form one group)"
            )
        return self


def common_args(cfg: PostTrainConfig, output_dir: str, max_length: int) -> dict[str, Any]:
    """TrainingArguments fields every TRL config takes. CPU: DDP over gloo with `use_cpu`
    (accelerate takes its DeepSpeed path only with a GPU backend); GPU: bf16 + DeepSpeed."""
    gpu = cfg.scaling.use_gpu
    return dict(
        output_dir=output_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.micro_batch,
        per_device_eval_batch_size=cfg.micro_batch, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        lr_scheduler_type="cosine", max_grad_norm=cfg.grad_clip, logging_steps=cfg.log_every, save_strategy="steps",
        save_steps=cfg.checkpoint_every, save_total_limit=cfg.keep_checkpoints,
        eval_strategy="steps" if cfg.eval_every else "no", eval_steps=cfg.eval_every,
        report_to=[], seed=cfg.seed, data_seed=cfg.seed, use_cpu=not gpu, bf16=gpu,
        deepspeed=deepspeed_config(cfg, for_hf_trainer=True) if gpu else None, dataloader_num_workers=0,
        gradient_checkpointing=cfg.activation_checkpointing,
        disable_tqdm=True, save_only_model=False, ddp_find_unused_parameters=False,
    )
