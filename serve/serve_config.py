"""The `serve` section of a recipe: which models, their Ray Serve deployments, limits and auth."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from cluster.config import StrictModel
from jobs.vllm_batch import CpuThreads
from serve.demo_check import DemoCheckConfig
from serve.deployment_config import DeploymentLimits
from serve.feedback.feedback_config import FeedbackConfig
from serve.moderation.moderation_config import ModerationConfig
from serve.qa.qa_config import QAConfig


class SamplingDefaults(StrictModel):
    """What a request that does not set these gets: vLLM's `override_generation_config`.
    A small model left to greedy decoding loops; a frequency penalty on its own tokens stops
    that without keeping it from copying the prompt (a retrieved passage), which a repetition
    penalty over the prompt would."""

    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=2)


class ModelSpec(StrictModel):
    """A model the gateway serves: a local folder / stage (fp or AWQ), or a remote upstream."""

    name: str = Field(description="the `model` field clients send")
    source: str | None = Field(default=None, description="stage name (its `model` output) or a model folder")
    upstream: str | None = Field(default=None, description="base URL of an OpenAI-compatible server, e.g. https://host/v1")
    upstream_model: str | None = Field(default=None, description="model name at the upstream (default: name)")
    api_key_env: str | None = Field(default=None, description="env var holding the upstream's API key")
    max_batch: int = Field(default=16, ge=1, description="sequences vLLM decodes together (max_num_seqs)")
    stream_interval_ms: float = Field(default=100, ge=0, le=1000,
                                      description="a stream's tokens are sent at most this often, several per "
                                                  "message (Ray Serve LLM's stream batching interval); each message "
                                                  "costs CPU at every hop")
    max_model_len: int | None = Field(default=None, ge=16, description="vLLM's context (default: the model's "
                                                                        "max_position_embeddings)")
    enforce_eager: bool | None = Field(default=None, description="vLLM without graph compilation (default: on CPU, "
                                                                 "where compiling costs a minute per replica start)")
    kv_cache_gib: int = Field(default=1, ge=1, description="vLLM's KV cache on CPU (VLLM_CPU_KVCACHE_SPACE)")
    cpu_threads: CpuThreads = "auto"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="more vLLM engine arguments, passed as is "
                                                                            "(e.g. tensor_parallel_size, dtype)")
    max_concurrent: int = Field(default=64, ge=1, description="requests in flight per gateway replica; more get 429")
    default_max_tokens: int = Field(default=128, ge=1, description="when a request sets no max_tokens (capped to the "
                                                                  "room its prompt leaves in the context)")
    sampling_defaults: SamplingDefaults = Field(default_factory=SamplingDefaults)
    deployment: DeploymentLimits = Field(default_factory=DeploymentLimits)

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelSpec":
        if (self.source is None) == (self.upstream is None):
            raise ValueError(f"model {self.name!r}: set exactly one of `source` (a local model) or `upstream` (a URL)")
        if self.upstream is not None and not re.match(r"^https?://", self.upstream):
            raise ValueError(f"model {self.name!r}: upstream must be an http(s) URL, got {self.upstream!r}")
        return self


class AuthConfig(StrictModel):
    """Bearer API keys. Off only when `enabled: false` is written in the recipe."""

    enabled: bool = True
    keys_env: str = Field(default="AERO_API_KEYS", description="env var with comma-separated keys")
    keys_file: str | None = Field(default=None, description="file with one key per line")


class PagesConfig(StrictModel):
    """The chat (`/chat`) and Q&A (`/qa`) pages the gateway serves."""

    enabled: bool = True
    chat_template: str = Field(default="chat.v1", description="prompt template whose system prompt the chat page "
                                                              "starts with")


class ServeConfig(StrictModel):
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(name="aero", source="quantize")], min_length=1)
    app_name: str = "aero"
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    route_prefix: str = "/"
    auth: AuthConfig = Field(default_factory=AuthConfig)
    ingress: DeploymentLimits = Field(default_factory=lambda: DeploymentLimits(
        max_ongoing_requests=128, max_queued_requests=64, num_cpus=0.5))
    request_timeout_s: float = Field(default=120, gt=0, description="a request running longer is ended with 504")
    max_request_bytes: int = Field(default=1_000_000, ge=1024, description="larger bodies get 413 before parsing")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After sent with 429/503")
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)
    qa: QAConfig = Field(default_factory=QAConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    pages: PagesConfig = Field(default_factory=PagesConfig)
    check: DemoCheckConfig = Field(default_factory=DemoCheckConfig, description="after deploying: the demo's "
                                   "questions and held-out Q&A items through the live routes (check.json)")
    prompt_dirs: list[str] = Field(default_factory=list, description="folders of prompt templates (name.vN.yaml), "
                                                                     "searched before the shipped ones")

    @model_validator(mode="after")
    def _unique(self) -> "ServeConfig":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names repeat: {names}")
        if self.qa.model is not None and self.qa.model not in names:
            raise ValueError(f"qa.model {self.qa.model!r} is not among the served models {names}")
        return self

    @property
    def qa_model(self) -> str:
        return self.qa.model or self.models[0].name
