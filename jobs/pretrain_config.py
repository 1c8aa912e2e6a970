"""The typed config of stage `pretrain`, and the checks that must pass before any worker starts."""

from __future__ import annotations

from pydantic import Field

from jobs.model_factory import ModelConfig
from jobs.training_config import TrainingConfig

# Peak dense bf16 TFLOP/s of known accelerators, for MFU when the config gives none.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


class PretrainConfig(TrainingConfig):
    model: ModelConfig = ModelConfig()
    steps: int = Field(default=60, ge=1)
    global_batch: int | None = Field(default=16, ge=1, description="sequences per optimizer step, all workers")
    lr: float = Field(default=3e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=10, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    checkpoint_every: int = Field(default=20, ge=1)
    eval_every: int = Field(default=20, ge=1)
    log_every: int = Field(default=10, ge=1, description="steps between metric reports to Ray (each is a barrier)")
    eval_batches: int = Field(default=4, ge=1)
    peak_tflops: float | None = Field(default=None, gt=0, description="per device; default from the GPU table")
