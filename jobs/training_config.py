"""The one training vocabulary that pretraining and post-training share: how many workers
(`scaling`), the batch (`micro_batch` per worker per forward pass, `global_batch` per
optimizer step over all workers; accumulation is what lies between), the schedule
(`steps`, `warmup_steps`, `lr`), checkpoints, logging and ZeRO; and the one DeepSpeed
config built from it. Keys of the older per-stage vocabularies fail with the new name."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.config import CustomResources, StrictModel

# Older keys -> what to write instead (a recipe written for them fails with this message).
RENAMED_KEYS = {
    "per_device_batch": "micro_batch",
    "grad_accum": "global_batch (= micro_batch x scaling.num_workers x accumulation steps)",
    "warmup_ratio": "warmup_steps (a number of steps)",
    "report_every": "log_every",
}


class Scaling(StrictModel):
    """Ray Train's workers: how many, on what, and where."""

    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    threads_per_worker: int = Field(default=1, ge=1, description="torch intra-op threads on CPU workers")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK", description="Ray Train's worker placement: PACK fills a node first, SPREAD puts workers "
                                    "on different nodes where it can")
    resources: CustomResources = Field(default_factory=dict, description="custom Ray resources each worker needs, "
                                       "e.g. one that only a node pool offers, to keep training on that pool")

    def ray_scaling(self):
        """Ray Train's ScalingConfig for these workers (pretrain and the TRL stages share it)."""
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker={"CPU": self.cpus_per_worker, **self.resources},
                             placement_strategy=self.placement_strategy)


class TrainingConfig(StrictModel):
    """Fields every training stage has; a stage's config adds its own and may change defaults."""

    scaling: Scaling = Scaling()
    steps: int = Field(default=30, ge=1, description="optimizer steps")
    micro_batch: int = Field(default=4, ge=1, description="sequences (or examples) per forward pass per worker")
    global_batch: int | None = Field(default=None, ge=1, description="per optimizer step over all workers; a "
                                     "multiple of micro_batch x num_workers (default: that product, no accumulation)")
    lr: float = Field(default=5e-4, gt=0)
    warmup_steps: int = Field(default=3, ge=0, description="linear warmup before the decay")
    weight_decay: float = Field(default=0.0, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    activation_checkpointing: bool = Field(default=False, description="recompute activations in the backward "
                                           "pass: less memory, ~30% more compute")
    checkpoint_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    log_every: int = Field(default=5, ge=1, description="steps between metric reports")
    max_failures: int = Field(default=2, ge=0)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _new_vocabulary(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        old = [k for k in RENAMED_KEYS if k in data]
        if old:
            raise ValueError("; ".join(f"{k} is no longer a key: use {RENAMED_KEYS[k]}" for k in old))
        if data.get("global_batch", cls.model_fields["global_batch"].default) is None:
            # no accumulation: one micro-batch per worker per step (a wrong-typed value is left
            # for field validation to name)
            scaling = data.get("scaling", {})
            workers = scaling.num_workers if isinstance(scaling, Scaling) else (
                scaling.get("num_workers", 2) if isinstance(scaling, dict) else None)
            micro = data.get("micro_batch", cls.model_fields["micro_batch"].default)
            if isinstance(workers, int) and isinstance(micro, int):
                data = {**data, "global_batch": micro * workers}
        return data

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> "TrainingConfig":
        per_step = self.micro_batch * self.scaling.num_workers
        if self.global_batch is not None and self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by micro_batch x num_workers = {per_step}"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        return self

    @property
    def grad_accum(self) -> int:
        """Micro-batches each worker accumulates per optimizer step."""
        return (self.global_batch or 0) // (self.micro_batch * self.scaling.num_workers)


def deepspeed_config(cfg: TrainingConfig, *, for_hf_trainer: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a run. `for_hf_trainer`: the batch, clipping and bf16 fields are
    "auto", which transformers fills from its TrainingArguments (built from the same `cfg`)."""
    gpu = cfg.scaling.use_gpu
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": gpu, "contiguous_gradients": True}
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if for_hf_trainer:
        if cfg.zero_stage == 3:
            zero["stage3_gather_16bit_weights_on_model_save"] = True
        return {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
                "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
