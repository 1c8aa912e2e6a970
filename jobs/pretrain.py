"""Stage `pretrain`: a Llama model trained from scratch on the packed shards, with DeepSpeed
ZeRO under Ray Train's TorchTrainer (N workers; gloo on CPU, nccl on GPU), resumable, and
exported in Hugging Face format with the trained tokenizer.

The loop itself is `jobs.train_loop.run_training` (runs without Ray too). Each worker reads
its own equal, deterministic split of the shards (`Dataset.split`), so a resumed run
continues the same data order.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from cluster.errors import UserError
from cluster.manifest import atomic_write_text
from cluster.records import plot_curves, read_history
from cluster.stage import Stage, StageContext, StageResult
from jobs.pretrain_config import PEAK_TFLOPS, PretrainConfig


def plan_run(cfg: PretrainConfig, index: dict) -> dict:
    """Everything the workers need from the shards' index; fails before any worker starts."""
    seq_len = index["seq_len"]
    max_pos = cfg.model.max_position_embeddings or seq_len
    if seq_len > max_pos:
        raise UserError(f"pretrain.model.max_position_embeddings {max_pos} is shorter than the shards' seq_len {seq_len}")
    for split in ("train", "val"):
        info = index["splits"].get(split)
        if not info or not info.get("files") or not Path(info["path"]).is_dir():
            raise UserError(f"pretrain: no {split} shards found (index says {info and info.get('path')})")
    workers = cfg.scaling.num_workers
    per_worker = index["splits"]["train"]["sequences"] // workers
    if per_worker < cfg.micro_batch:
        raise UserError(
            f"pretrain: {index['splits']['train']['sequences']} train sequences give {per_worker} per worker, "
            f"fewer than micro_batch {cfg.micro_batch}"
        )
    if index["splits"]["val"]["sequences"] // workers < cfg.micro_batch:
        raise UserError(f"pretrain: too few val sequences for {workers} workers x micro_batch {cfg.micro_batch}")
    peak = cfg.peak_tflops
    if peak is None and cfg.scaling.use_gpu:
        import torch

        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    return {
        "vocab_size": index["vocab_size"], "seq_len": seq_len, "bos_id": index["bos_id"], "eos_id": index["eos_id"],
        "pad_id": index["pad_id"], "sequences_per_worker": per_worker, "world_size": workers,
        "peak_flops": peak * 1e12 if peak else None,
    }


def export_model(cfg: PretrainConfig, plan: dict, checkpoint_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Weights from the DeepSpeed checkpoint (ZeRO shards consolidated) -> safetensors + config + tokenizer."""
    import torch
    from transformers import AutoTokenizer

    from jobs.model_factory import build_model, llama_config

    config = llama_config(cfg.model, vocab_size=plan["vocab_size"], seq_len=plan["seq_len"],
                          bos_id=plan["bos_id"], eos_id=plan["eos_id"], pad_id=plan["pad_id"])
    model = build_model(config, use_gpu=False)
    if cfg.zero_stage == 0:
        state = torch.load(checkpoint_dir / "ckpt" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag="ckpt")
    model.load_state_dict(state)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(out))
    return out


def _plot_losses(history: list[dict], path: Path) -> None:
    plot_curves({"train loss": [(h["step"], h["loss"]) for h in history],
                 "val loss": [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]},
                path, ylabel="loss")


def run(ctx: StageContext, cfg: PretrainConfig) -> StageResult:
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from jobs.train_loop import ray_train_loop

    index = json.loads(ctx.upstream_output("tokenizer", "index").read_text())
    plan = plan_run(cfg, index)
    plan["log_dir"] = str(ctx.stage_dir.resolve())
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    workers = cfg.scaling.num_workers
    datasets = {}
    for split in ("train", "val"):
        parts = ray.data.read_parquet(index["splits"][split]["path"]).split(workers, equal=True)
        datasets.update({f"{split}_{rank}": part for rank, part in enumerate(parts)})
    trainer = TorchTrainer(
        ray_train_loop,
        train_loop_config={"config": cfg.model_dump(), "plan": plan},
        scaling_config=cfg.scaling.ray_scaling(),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(
            name="pretrain",
            storage_path=ctx.checkpoint_storage,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("pretrain finished without a checkpoint")
    _plot_losses(read_history(ctx.stage_dir / "metrics.jsonl"), ctx.stage_dir / "loss.png")
    with result.checkpoint.as_directory() as d:
        model_dir = export_model(cfg, plan, Path(d), Path(index["tokenizer"]), ctx.stage_dir / "model")
    final = result.metrics
    summary = {k: final.get(k) for k in ("step", "loss", "val_loss", "val_ppl", "tokens_per_s", "mfu",
                                         "peak_rss_mb", "peak_gpu_mb")}
    atomic_write_text(ctx.stage_dir / "train.json", json.dumps(summary, indent=2) + "\n")
    return StageResult(
        outputs={"model": model_dir, "metrics": ctx.stage_dir / "metrics.jsonl", "loss_curve": ctx.stage_dir / "loss.png"},
        metrics=summary,
    )


def memory_needs(recipe, cfg: PretrainConfig) -> list:
    """The planner's figure for one pretraining worker (cluster/plan.py)."""
    from jobs.memory_estimate import model_shape_for, training_needs

    shape = model_shape_for(recipe, "pretrain")
    return [training_needs(
        "pretrain", shape, workers=cfg.scaling.num_workers, gpu=cfg.scaling.use_gpu,
        cpus_per_worker=cfg.scaling.cpus_per_worker, zero_stage=cfg.zero_stage, batch=cfg.micro_batch,
        seq_len=recipe.stage_config("tokenizer").seq_len, activation_checkpointing=cfg.activation_checkpointing,
        offload_optimizer=cfg.offload_optimizer,
    )]


STAGE = Stage(
    name="pretrain",
    config_model=PretrainConfig,
    run=run,
    memory=memory_needs,
    needs=("tokenizer",),
    description="pretrain a Llama model with DeepSpeed ZeRO on Ray Train",
)
