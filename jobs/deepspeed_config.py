"""The DeepSpeed config of a training run, built from the typed stage config (one place)."""

from __future__ import annotations

from typing import Any

from jobs.pretrain_config import PretrainConfig


def deepspeed_config(cfg: PretrainConfig) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": cfg.zero_stage, "overlap_comm": cfg.scaling.use_gpu, "contiguous_gradients": True}
    if cfg.offload_optimizer and cfg.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.global_batch,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.scaling.use_gpu},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
