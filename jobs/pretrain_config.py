"""The typed config of stage `pretrain`, and the checks that must pass before any worker starts."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cluster.config import StrictModel
from jobs.model_factory import ModelConfig

# Peak dense bf16 TFLOP/s of known accelerators, for MFU when the config gives none.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


class ScalingConfig(StrictModel):
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    threads_per_worker: int = Field(default=1, ge=1, description="torch intra-op threads on CPU workers")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="PACK", description="Ray Train's worker placement: PACK fills a node first, SPREAD puts workers "
                                    "on different nodes where it can")


class PretrainConfig(StrictModel):
    model: ModelConfig = ModelConfig()
    scaling: ScalingConfig = ScalingConfig()
    steps: int = Field(default=60, ge=1)
    global_batch: int = Field(default=16, ge=1, description="sequences per optimizer step, all workers")
    micro_batch: int = Field(default=4, ge=1, description="sequences per forward pass per worker")
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    activation_checkpointing: bool = False
    checkpoint_every: int = Field(default=20, ge=1)
    keep_checkpoints: int = Field(default=2, ge=1)
    eval_every: int = Field(default=20, ge=1)
    report_every: int = Field(default=10, ge=1, description="steps between metric reports to Ray (each is a barrier)")
    eval_batches: int = Field(default=4, ge=1)
    max_failures: int = Field(default=2, ge=0)
    peak_tflops: float | None = Field(default=None, gt=0, description="per device; default from the GPU table")
    seed: int = 0

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> "PretrainConfig":
        per_step = self.micro_batch * self.scaling.num_workers
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.global_batch} is not divisible by micro_batch x num_workers = {per_step}"
            )
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        return self

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.scaling.num_workers)
