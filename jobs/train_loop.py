"""The per-worker pretraining loop: config + data in, metrics + checkpoints out.

`run_training` is a plain function. Ray Train's TorchTrainer calls it through
`ray_train_loop` (with `RayTrainEnv`: dataset shards, `ray.train.report`, checkpoints in Ray
storage); `LocalEnv` runs it in one process without Ray (tests, a GPU box without Ray).
The data position (micro-batches consumed) is saved in every checkpoint, so a resumed run
neither repeats nor skips data and ends at the configured step count.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from jobs.pretrain_config import PretrainConfig


def warmup_cosine(cfg: PretrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _micro_batches(env, start: int, per_epoch: int) -> Iterator[Any]:
    """Micro-batches from position `start` (counted across epochs) onwards, forever."""
    epoch, offset = divmod(start, per_epoch)
    while True:
        for i, batch in enumerate(env.train_batches(epoch)):
            if i >= per_epoch:
                break
            if i >= offset:
                yield batch
        epoch, offset = epoch + 1, 0


def run_training(cfg: PretrainConfig, plan: dict[str, Any], env) -> dict[str, Any]:
    """Train; report metrics every step and a checkpoint every `checkpoint_every` steps."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from jobs.training_config import deepspeed_config
    from jobs.model_factory import build_model, flops_per_token, llama_config

    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.threads_per_worker)
    torch.manual_seed(cfg.seed)
    config = llama_config(cfg.model, vocab_size=plan["vocab_size"], seq_len=plan["seq_len"],
                          bos_id=plan["bos_id"], eos_id=plan["eos_id"], pad_id=plan["pad_id"])
    model = build_model(config, use_gpu=cfg.scaling.use_gpu)
    if cfg.activation_checkpointing:  # transformers renamed gradient_ to activation_checkpointing_enable
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    if cfg.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg), dist_init_required=False
    )

    step, consumed = 0, 0
    with env.latest_checkpoint() as ckpt_dir:
        if ckpt_dir is not None:
            _, client = engine.load_checkpoint(ckpt_dir, tag="ckpt")
            step, consumed = int(client["step"]), int(client["consumed"])
    per_epoch = plan["sequences_per_worker"] // cfg.micro_batch
    batches = _micro_batches(env, consumed, per_epoch)
    tokens_per_step = cfg.global_batch * plan["seq_len"]
    flops = flops_per_token(config, plan["seq_len"])
    peak = plan.get("peak_flops")
    device = env.device
    metrics: dict[str, Any] = {}

    while step < cfg.steps:
        start = time.perf_counter()
        losses, checksum = [], 0
        for _ in range(cfg.grad_accum):
            ids = next(batches).to(device)
            checksum = (checksum * 31 + int(ids[:, :8].sum())) % 2_147_483_647
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            consumed += 1
        step += 1
        loss_value = torch.stack(losses).mean()
        if dist.is_initialized():
            dist.all_reduce(loss_value)
            loss_value /= dist.get_world_size()
        loss_value = float(loss_value)
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            # In fp32/bf16 nothing skips a bad step: inf gradients have already corrupted the weights.
            raise FloatingPointError(
                f"loss {loss_value} / gradient norm {grad_norm} is not finite at step {step}: stopping; "
                "the last good checkpoint is kept (lower pretrain.lr or raise warmup_steps)"
            )
        elapsed = time.perf_counter() - start
        tokens_per_s = tokens_per_step / elapsed
        peak_rss_mb, peak_gpu_mb = _peak_memory_mb(device)
        metrics = {
            "step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
            "step_time_s": elapsed, "wall_time": time.time(), "consumed_micro_batches": consumed,
            "batch_checksum": checksum,
            "mfu": flops * tokens_per_s / (peak * plan["world_size"]) if peak else None,
            "peak_rss_mb": peak_rss_mb, "peak_gpu_mb": peak_gpu_mb,
        }
        if step % cfg.eval_every == 0 or step == cfg.steps:
            metrics["val_loss"] = _validate(engine, env, cfg, device)
            metrics["val_ppl"] = math.exp(min(metrics["val_loss"], 50))
        env.log(metrics)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            tmp = tempfile.mkdtemp(prefix="aero-ckpt-")
            engine.save_checkpoint(tmp, tag="ckpt", client_state={"step": step, "consumed": consumed})
            env.report(metrics, checkpoint_dir=tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        elif step % cfg.log_every == 0:
            env.report(metrics)  # a report is a barrier across workers: not every step
    env.close()
    return metrics


def _peak_memory_mb(device) -> tuple[float, float | None]:
    """The largest peak over all workers: process RSS (the planner's CPU figure) and, on GPU,
    what PyTorch's allocator reserved (the planner's GPU figure, less the CUDA context)."""
    import resource

    import torch
    import torch.distributed as dist

    gpu = str(device).startswith("cuda")
    values = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
              torch.cuda.max_memory_reserved() / 2**20 if gpu else 0.0]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    rss, reserved = tensor.tolist()
    return round(rss, 1), round(reserved, 1) if gpu else None


def _validate(engine, env, cfg: PretrainConfig, device) -> float:
    import torch
    import torch.distributed as dist

    engine.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.no_grad():
        for i, ids in enumerate(env.val_batches()):
            if i >= cfg.eval_batches:
                break
            ids = ids.to(device)
            total += engine(input_ids=ids, labels=ids).loss.float()
            count += 1
    engine.train()
    if dist.is_initialized():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return float(total / count.clamp(min=1))


class TrainEnv:
    """What both environments share: rank 0's per-step metrics as JSON lines (the stage's loss
    curve reads them) and TensorBoard, and train/val micro-batches from a subclass's `_iter`."""

    def __init__(self, log_dir: str | None, rank: int) -> None:
        self.path = Path(log_dir) / "metrics.jsonl" if log_dir and rank == 0 else None
        self.writer = None
        if self.path is not None:
            from tensorboardX import SummaryWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, metrics: dict) -> None:
        if self.path is None:
            return
        import json

        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(metrics) + "\n")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in ("step", "wall_time"):
                self.writer.add_scalar(f"pretrain/{key}", value, metrics["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def train_batches(self, epoch: int):
        return self._iter("train")

    def val_batches(self):
        return self._iter("val")


class RayTrainEnv(TrainEnv):
    """Data shards, reporting and checkpoints through Ray Train (inside a TorchTrainer worker)."""

    def __init__(self, micro_batch: int, log_dir: str | None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.micro_batch = micro_batch
        super().__init__(log_dir, self.rank)

    def _iter(self, name: str):
        import ray.train
        import torch

        shard = ray.train.get_dataset_shard(f"{name}_{self.rank}")
        for batch in shard.iter_torch_batches(batch_size=self.micro_batch, drop_last=True, dtypes=torch.long):
            yield batch["input_ids"]

    def latest_checkpoint(self):
        import ray.train

        return checkpoint_dir(ray.train.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


@contextlib.contextmanager
def checkpoint_dir(checkpoint):
    """A Ray (Train or Tune) checkpoint as a local directory for the block, or None."""
    if checkpoint is None:
        yield None
    else:
        with checkpoint.as_directory() as d:
            yield d


def ray_train_loop(loop_config: dict) -> None:
    """The function Ray Train's TorchTrainer runs on every worker."""
    cfg = PretrainConfig.model_validate(loop_config["config"])
    run_training(cfg, loop_config["plan"], RayTrainEnv(cfg.micro_batch, loop_config["plan"].get("log_dir")))


class LocalEnv(TrainEnv):
    """One process, no Ray: shards read with pyarrow, checkpoints and metrics in `out_dir`."""

    def __init__(self, index: dict, micro_batch: int, out_dir: Path, device: str = "cpu") -> None:
        self.index, self.micro_batch, self.out_dir = index, micro_batch, Path(out_dir)
        self.device = device
        self.history: list[dict] = []
        super().__init__(str(out_dir), 0)
        (self.out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        _init_single_process_group("nccl" if device.startswith("cuda") else "gloo")

    def _iter(self, split: str):
        import numpy as np
        import pyarrow.dataset as pads
        import torch

        dataset = pads.dataset(self.index["splits"][split]["path"], format="parquet")
        pending = []
        for batch in dataset.to_batches(columns=["input_ids"]):
            for row in batch.column("input_ids").to_numpy(zero_copy_only=False):
                pending.append(row)
                if len(pending) == self.micro_batch:
                    yield torch.from_numpy(np.stack(pending).astype("int64"))
                    pending = []

    @contextlib.contextmanager
    def latest_checkpoint(self):
        found = sorted((self.out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        yield str(found[-1]) if found else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.history.append(dict(metrics))
        if checkpoint_dir:
            target = self.out_dir / "checkpoints" / f"step-{metrics['step']}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)


def _init_single_process_group(backend: str) -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    dist.init_process_group(backend=backend, rank=0, world_size=1)
