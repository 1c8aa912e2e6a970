"""Memory a training or serving worker needs, from the config alone (no model is built).

The pre-flight planner (`aero plan`, `cluster/plan.py`) asks each stage for these figures
before anything starts. Model states on a GPU in bf16 use DeepSpeed's own estimators for
ZeRO-2 and ZeRO-3 (`estimate_zero2_model_states_mem_needs`, `..._zero3_...`); DeepSpeed
has none for ZeRO-0/1 nor for fp32 training on CPU, so those follow the same accounting
written out here (weights, gradients, the fp32 master partition, two AdamW moments).
Activations and logits are counted per token from the Llama layer's saved tensors;
`bench/plan_bench.py` checks the sum against measured peaks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.plan import GiB

# A worker process before its model exists: Python, torch, transformers, DeepSpeed, Ray's
# worker runtime and the data iterator (RSS measured in Ray Train workers on CPU).
WORKER_RUNTIME_BYTES = int(0.75 * GiB)
# The CUDA context and cuBLAS/NCCL workspaces, outside PyTorch's allocator.
CUDA_CONTEXT_BYTES = int(0.6 * GiB)
# DeepSpeed's default ZeRO-2 reduce bucket (elements), which it allocates as one buffer.
REDUCE_BUCKET_ELEMENTS = 500_000_000


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on: parameter count and the layer dimensions."""

    params: int
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int
    context: int

    @property
    def largest_layer_params(self) -> int:
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim + 3 * self.hidden * self.intermediate
        return max(self.vocab * self.hidden, per_layer)


def llama_shape(config) -> ModelShape:
    """The shape of a transformers LlamaConfig (or any config with the same fields)."""
    from jobs.model_factory import parameter_count

    heads = config.num_attention_heads
    kv = config.hidden_size * getattr(config, "num_key_value_heads", heads) // heads
    return ModelShape(
        params=parameter_count(config), layers=config.num_hidden_layers, hidden=config.hidden_size, kv_dim=kv,
        intermediate=config.intermediate_size, vocab=config.vocab_size, context=config.max_position_embeddings,
    )


def shape_of_folder(folder: Path) -> ModelShape:
    """The shape of an exported Hugging Face model folder, from its config.json."""
    from transformers import LlamaConfig

    raw = json.loads((Path(folder) / "config.json").read_text())
    return llama_shape(LlamaConfig(**{k: v for k, v in raw.items() if k != "quantization_config"}))


def model_state_bytes(shape: ModelShape, *, world: int, zero_stage: int, gpu: bool,
                      offload_optimizer: bool = False) -> dict[str, int]:
    """Weights, gradients, fp32 master copy and AdamW moments on one worker (device memory
    on GPU, RAM on CPU), plus what an optimizer offload moves to host RAM (`host`)."""
    p, n = shape.params, world
    if gpu and zero_stage in (2, 3):
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        if zero_stage == 2:
            cpu, dev = estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=n, cpu_offload=offload_optimizer)
        else:
            cpu, dev, _ = estimate_zero3_model_states_mem_needs(
                p, shape.largest_layer_params, num_gpus_per_node=n, cpu_offload=offload_optimizer,
                cpu_offload_params=False, zero_init=False)
        return {"model_states": dev, "host": cpu if offload_optimizer else 0}
    if gpu:  # ZeRO-0/1, bf16: 16-bit weights and gradients whole; master + moments (12 B) split at stage 1
        split = n if zero_stage == 1 else 1
        optimizer = 12 * p // split
        if offload_optimizer and zero_stage == 1:
            return {"model_states": 4 * p, "host": optimizer + 4 * p // split}
        return {"model_states": 4 * p + optimizer + (4 * p // split if zero_stage == 1 else 0), "host": 0}
    # fp32 on CPU. DeepSpeed's ZeRO-1/2/3 optimizers keep their own fp32 partition of the
    # weights and of the gradients beside the model's (a clone even when the model is fp32),
    # and gradients pass through a reduce bucket of up to REDUCE_BUCKET_ELEMENTS.
    if zero_stage == 0:
        return {"model_states": 16 * p, "host": 0}
    part = p // n
    bucket = 4 * min(p, REDUCE_BUCKET_ELEMENTS)
    partitions = 4 * part + 4 * part + 8 * part  # master weights, gradient partition, AdamW moments
    if zero_stage == 1:
        return {"model_states": 4 * p + 4 * p + partitions, "host": 0}
    if zero_stage == 2:
        return {"model_states": 4 * p + bucket + partitions, "host": 0}
    # ZeRO-3 without zero.Init: parameters under stage3_max_live_parameters (1e9 by default)
    # are gathered whole for forward and backward, and each layer's full gradients exist
    # before they are reduced into the bucket.
    live = 4 * min(p, 10**9)
    return {"model_states": live + 4 * part + 4 * p + bucket + partitions, "host": 0}


def activation_bytes(shape: ModelShape, *, micro_batch: int, seq_len: int, gpu: bool,
                     activation_checkpointing: bool = False) -> dict[str, int]:
    """Saved activations of one micro-batch (SDPA/flash attention: nothing quadratic in the
    sequence), and the logits with the loss's fp32 copies, log-softmax and gradient."""
    width = 2 if gpu else 4
    tokens = micro_batch * seq_len
    # Per token and layer: norms' inputs and outputs, q/k/v (before and after RoPE), the
    # attention output, and the SwiGLU MLP's gate, up, SiLU and product (4 x intermediate).
    per_layer = (8 * shape.hidden + 4 * shape.kv_dim + 4 * shape.intermediate) * tokens * width
    if activation_checkpointing:
        layers = shape.layers * shape.hidden * tokens * width + per_layer
    else:
        layers = shape.layers * per_layer
    logits = tokens * shape.vocab * (width + 4 + 4 + 4)
    return {"activations": layers, "logits": logits}


def training_worker_bytes(shape: ModelShape, *, world: int, zero_stage: int, gpu: bool, micro_batch: int,
                          seq_len: int, activation_checkpointing: bool = False,
                          offload_optimizer: bool = False, frozen_copies: int = 0) -> dict[str, int]:
    """Everything one training worker holds at its peak: the breakdown by part.
    `frozen_copies`: extra models held for inference only (DPO's reference, a reward model)."""
    parts = model_state_bytes(shape, world=world, zero_stage=zero_stage, gpu=gpu, offload_optimizer=offload_optimizer)
    parts.update(activation_bytes(shape, micro_batch=micro_batch, seq_len=seq_len, gpu=gpu,
                                  activation_checkpointing=activation_checkpointing))
    if frozen_copies:
        parts["frozen_models"] = frozen_copies * shape.params * (2 if gpu else 4)
    return parts


def kv_cache_bytes(shape: ModelShape, *, sequences: int, context: int, gpu: bool) -> int:
    """Keys and values of `sequences` sequences of `context` tokens."""
    return 2 * shape.layers * shape.kv_dim * context * sequences * (2 if gpu else 4)


POST_TRAINING = ("sft", "reward", "judge", "dpo", "grpo")


def model_shape_for(recipe, ref: str) -> ModelShape | None:
    """The shape of the model a stage reference names, before that stage has run: its exported
    folder when it exists, else worked out from the recipe (pretrain's preset and the
    tokenizer's vocabulary; a post-training or compression stage's own base)."""
    folder = Path(ref)
    if (folder / "config.json").is_file():
        return shape_of_folder(folder)
    exported = recipe.run_dir / ref / "model" / "config.json"
    if exported.is_file():
        return shape_of_folder(exported.parent)
    if ref == "pretrain":
        from jobs.model_factory import llama_config

        tok = recipe.stage_config("tokenizer")
        cfg = recipe.stage_config("pretrain")
        return llama_shape(llama_config(cfg.model, vocab_size=tok.vocab_size, seq_len=tok.seq_len,
                                        bos_id=1, eos_id=2, pad_id=0))
    if ref in POST_TRAINING:
        return model_shape_for(recipe, recipe.stage_config(ref).base)
    if ref in ("quantize", "sparsify"):
        return model_shape_for(recipe, recipe.stage_config(ref).model)
    return None


def training_needs(stage: str, shape: ModelShape, *, workers: int, gpu: bool, cpus_per_worker: float,
                   zero_stage: int, batch: int, seq_len: int, activation_checkpointing: bool,
                   offload_optimizer: bool, sequences_per_example: int = 1, frozen_copies: int = 0,
                   trainable: bool = True, role: str = "training worker"):
    """A training stage's WorkerNeed, with the cheaper settings (as `stage.key value`) to
    suggest when it does not fit: ZeRO-3, activation checkpointing, smaller batches, optimizer
    offload. `batch` is the config's per-worker batch; each example is
    `sequences_per_example` sequences (a preference pair: 2)."""
    from cluster.plan import WorkerNeed

    def sized(**change) -> tuple[int, int, dict[str, int]]:
        settings = {"zero_stage": zero_stage, "batch": batch, "offload_optimizer": offload_optimizer,
                    "activation_checkpointing": activation_checkpointing, **change}
        parts = training_worker_bytes(
            shape, world=workers, gpu=gpu, seq_len=seq_len, frozen_copies=frozen_copies,
            zero_stage=settings["zero_stage"], micro_batch=settings["batch"] * sequences_per_example,
            activation_checkpointing=settings["activation_checkpointing"],
            offload_optimizer=settings["offload_optimizer"])
        if not trainable:  # LoRA: the base weights are frozen, its few adapter states are left out
            parts["model_states"] = 0
        host = parts.pop("host", 0)
        device = sum(parts.values())
        if gpu:  # the model is first built in fp32 on the host, then moved
            return WORKER_RUNTIME_BYTES + host + 4 * shape.params, device + CUDA_CONTEXT_BYTES, parts
        return WORKER_RUNTIME_BYTES + device, 0, parts

    ram, gpu_bytes, parts = sized()
    options: list[tuple[str, dict]] = []
    if gpu and zero_stage < 3:
        options.append(("zero_stage 3", {"zero_stage": 3}))
    if not activation_checkpointing:
        options.append(("activation_checkpointing true", {"activation_checkpointing": True}))
    smaller = batch
    while smaller > 1:
        smaller //= 2
        options.append((f"micro_batch {smaller}", {"batch": smaller}))
    if gpu and not offload_optimizer and zero_stage > 0:
        options.append(("offload_optimizer true", {"offload_optimizer": True}))
    alternatives = [(f"{stage}.{label}", *sized(**change)[:2]) for label, change in options]
    return WorkerNeed(stage=stage, role=f"{role}, ZeRO-{zero_stage}, micro_batch {batch}", workers=workers,
                      ram_bytes=ram, gpu_bytes=gpu_bytes, gpus_per_worker=1.0 if gpu else 0.0,
                      cpus_per_worker=cpus_per_worker, parts={"runtime": WORKER_RUNTIME_BYTES, **parts},
                      alternatives=alternatives, note=f"{shape.params / 1e6:.0f}M params")
