"""Llama-architecture models from transformers, by named size preset with any field overridable.

Attention is FlashAttention-2 when flash-attn imports and CUDA is present, else PyTorch SDPA
(which has its own flash kernels on GPU); the choice is logged. bf16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, Literal

from pydantic import Field

from cluster.config import StrictModel

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


class ModelConfig(StrictModel):
    preset: Literal["tiny", "125m", "1b", "7b"] = "tiny"
    overrides: dict[str, Any] = Field(default_factory=dict, description="any LlamaConfig field")
    max_position_embeddings: int | None = Field(default=None, ge=8, description="default: the shards' seq_len")


def pick_attention() -> str:
    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def llama_config(cfg: ModelConfig, *, vocab_size: int, seq_len: int, bos_id: int, eos_id: int, pad_id: int):
    from transformers import LlamaConfig

    fields = {**PRESETS[cfg.preset], **cfg.overrides}
    return LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=cfg.max_position_embeddings or seq_len,
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=False, **fields,
    )


def build_model(config, *, use_gpu: bool):
    """A freshly initialized LlamaForCausalLM for `config` (a LlamaConfig)."""
    import torch
    from transformers import LlamaForCausalLM

    attention = pick_attention() if use_gpu else "sdpa"
    dtype = torch.bfloat16 if use_gpu else torch.float32
    log.warning("aero: model %s layers x %s hidden, attention=%s, dtype=%s",
                config.num_hidden_layers, config.hidden_size, attention, dtype)
    config._attn_implementation = attention
    return LlamaForCausalLM(config).to(dtype)


def parameter_count(config) -> int:
    """Parameters of a Llama with untied embeddings, from its config (no model built)."""
    h, i, layers, v = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h
    return layers * per_layer + 2 * v * h + h


def flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (forward + backward matmuls) + 12 L h s (attention scores),
    as in the PaLM paper's MFU definition."""
    return 6 * parameter_count(config) + 12 * config.num_hidden_layers * config.hidden_size * seq_len
