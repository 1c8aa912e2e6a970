"""The `generate` section of a recipe: which rows, which prompt, which model, how to sample."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from cluster.config import StrictModel
from jobs.vllm_batch import BatchEngine


class Sampling(StrictModel):
    max_tokens: int = Field(default=64, ge=1)
    min_tokens: int = Field(default=0, ge=0, description="no end of sequence before this many tokens")
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    stop: list[str] = Field(default_factory=list, max_length=4)

    @model_validator(mode="after")
    def _min_below_max(self) -> "Sampling":
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) is over max_tokens ({self.max_tokens})")
        return self


class OutputModeration(StrictModel):
    """The serving stage's classifier over the generated text: flagged rows are marked, not dropped."""

    enabled: bool = False
    classifier: str = Field(default="moderation", description="the moderation stage (its `classifier`) or a folder")


class GenerateConfig(BatchEngine):
    """The rows, the prompt, the model or upstream, the sampling; the engine's settings are
    `BatchEngine`'s (`concurrency`: engine replicas, or parallel HTTP workers)."""

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
    shard_rows: int = Field(default=64, ge=1, description="rows per output parquet shard (the unit of resume)")
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
