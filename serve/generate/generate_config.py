"""The `generate` section of a recipe: which rows, which prompt, which model, how to sample."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.config import StrictModel


class Sampling(StrictModel):
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stop: list[str] = Field(default_factory=list, max_length=4)


class OutputModeration(StrictModel):
    """The serving stage's classifier over the generated text: flagged rows are marked, not dropped."""

    enabled: bool = False
    classifier: str = Field(default="moderation", description="the moderation stage (its `classifier`) or a folder")


class GenerateConfig(StrictModel):
    input: str = Field(default="data", description="a .jsonl or .parquet file, a folder of .parquet files, or a "
                                                   "stage (the `data` stage: its cleaned documents)")
    id_field: str | None = Field(default=None, description="the input's row id column (default: `doc_id` for the "
                                                           "data stage, else the row's position in the input)")
    template: str = Field(description="a Jinja file (.j2 / .jinja), or a project prompt template `name.vN` "
                                      "(serve/prompts/ or prompt_dirs); the row's fields fill it")
    few_shot: str | None = Field(default=None, description="JSONL of examples, given to a Jinja template as `examples`")
    prompt_dirs: list[str] = Field(default_factory=list)
    chat: Literal["auto", "on", "off"] = Field(default="auto", description="apply the model's chat template "
                                                                           "(auto: when it has one)")
    model: str | None = Field(default=None, description="a stage (its `model`) or a model folder, run with vLLM")
    upstream: str | None = Field(default=None, description="instead of `model`: an OpenAI-compatible base URL "
                                                           "(…/v1); its chat completions route is called")
    upstream_model: str | None = None
    api_key_env: str | None = Field(default=None, description="env var holding the upstream's API key")
    sampling: Sampling = Field(default_factory=Sampling)
    max_rows: int | None = Field(default=None, ge=1, description="only the first N rows (a dry run)")
    sample: int | None = Field(default=None, ge=1, description="a seeded random sample of N rows instead")
    sample_seed: int = 0
    batch_size: int = Field(default=16, ge=1, description="rows per batch sent to the engine")
    shard_rows: int = Field(default=64, ge=1, description="rows per output parquet shard (the unit of resume)")
    max_model_len: int | None = Field(default=None, ge=16)
    cpus: float = Field(default=1.0, gt=0, description="the engine's CPU bundle (CPU machines)")
    gpus: float = Field(default=0.0, ge=0, description="GPUs per engine replica (0: vLLM's CPU build)")
    kv_cache_gib: int = Field(default=1, ge=1, description="vLLM's KV cache on CPU (VLLM_CPU_KVCACHE_SPACE)")
    helper_cpus: float = Field(default=0.1, gt=0, description="CPUs of each light step around the engine (templating, "
                                                               "tokenizing, pre/post-processing); Ray Data LLM's default "
                                                               "of 1 each leaves a 2-CPU machine no room for the engine")
    concurrency: int = Field(default=1, ge=1, description="engine replicas (or parallel HTTP workers)")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    moderation: OutputModeration = Field(default_factory=OutputModeration)

    @model_validator(mode="after")
    def _one_engine(self) -> "GenerateConfig":
        if (self.model is None) == (self.upstream is None):
            raise ValueError("set exactly one of `model` (a stage or folder, run with vLLM) or `upstream` (a URL)")
        if self.upstream is not None and not re.match(r"^https?://", self.upstream):
            raise ValueError(f"upstream must be an http(s) URL, got {self.upstream!r}")
        if self.max_rows is not None and self.sample is not None:
            raise ValueError("set max_rows or sample, not both")
        return self
