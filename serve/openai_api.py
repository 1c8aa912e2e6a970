"""OpenAI's wire format: request models, error bodies, and response / stream-chunk builders."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class APIError(Exception):
    """An error the gateway answers in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers, self.extra = headers or {}, extra or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's error object; `extra` adds keys of ours (e.g. `moderation`: why an input was flagged)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


class _Request(BaseModel):
    # Clients send fields we do not use (user, metadata, ...): ignore them, like OpenAI does.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=8)
    seed: int | None = Field(default=None, ge=0, le=2**62)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    min_tokens: int = Field(default=0, ge=0, description="vLLM's extension: no end of sequence before this many tokens")
    # None: the served model's default (serve.models[].sampling_defaults).
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2, description="vLLM's extension")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop: up to 4 non-empty strings")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            parts = []
            for p in self.content:
                if p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ValueError("only text content parts are supported")
                parts.append(p["text"])
            return "".join(parts)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # OpenAI's: keep this reply (here: in the feedback database, so it can be rated) and tag it.
    store: bool = False
    metadata: dict[str, str] | None = None

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v):
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata: at most 16 pairs, keys up to 64 and values up to 512 characters")
        return v


class CompletionRequest(_Request):
    # As vLLM takes it: a string, a list of strings, a list of token ids, or a list of such lists.
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _some_prompt(cls, v):
        if isinstance(v, list) and (not v or any(isinstance(p, list) and not p for p in v)):
            raise ValueError("prompt: an empty list")
        return v

    def single_prompt(self) -> bool:
        return isinstance(self.prompt, str) or (bool(self.prompt) and isinstance(self.prompt[0], int))

    def prompts(self) -> list[str | list[int]]:
        return [self.prompt] if self.single_prompt() else list(self.prompt)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def now() -> int:
    return int(time.time())


class ModerationRequest(BaseModel):
    """`POST /v1/moderations`: `input` is a string, a list of strings, or a list of
    `{"type": "text", "text": ...}` parts (images are refused)."""

    model_config = ConfigDict(extra="ignore")
    input: str | list[str | dict[str, Any]]
    model: str | None = None

    def texts(self) -> list[str]:
        items = [self.input] if isinstance(self.input, str) else self.input
        if not items:
            raise ValueError("input: give at least one string")
        out = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                if item.get("type") != "text" or not isinstance(item.get("text"), str):
                    raise ValueError(f"input[{i}]: only text parts ({{'type': 'text', 'text': ...}}) are supported")
                item = item["text"]
            out.append(item)
        return out
