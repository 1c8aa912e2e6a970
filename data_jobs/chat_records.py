"""Reading and checking chat records in the formats TRL trainers take.

Accepted shapes (jsonl or parquet, one record per row):
- SFT: `messages` (a conversation ending with an assistant turn), or `prompt` + `completion`
  (strings or message lists);
- preferences: `prompt` + `chosen` + `rejected` (strings or message lists; a `messages`-style
  `chosen`/`rejected` that repeats the prompt is split at the last assistant turn).

Everything is normalized to TRL's conversational prompt-completion / preference form:
`prompt` = list of messages ending with a user turn, `completion` / `chosen` / `rejected` =
one assistant message. A bad record becomes a `Problem` with its index and reason; callers
keep the good ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

ROLES = ("system", "user", "assistant")


@dataclass
class Problem:
    source: str
    index: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "index": self.index, "reason": self.reason}


class RecordError(ValueError):
    """A record that cannot be used; the message says why."""


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, row) pairs; a jsonl line that is not JSON yields a RecordError in place of the row."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, RecordError(f"line {i + 1} is not JSON ({e.msg})")


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"`{field}` is empty")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RecordError(f"`{field}` must be a non-empty string or list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError(f"`{field}[{j}]` is not a message with role in {ROLES} and string content")
        if not m["content"].strip():
            raise RecordError(f"`{field}[{j}]` has empty content")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def check_prompt(prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """An optional system turn, then user/assistant alternating, ending with a user turn."""
    turns = prompt[1:] if prompt[0]["role"] == "system" else prompt
    if not turns:
        raise RecordError("the prompt has only a system message")
    for j, m in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise RecordError(f"wrong role order: turn {j} is {m['role']!r}, expected {expected!r}")
    if turns[-1]["role"] != "user":
        raise RecordError("the prompt must end with a user turn")
    return prompt


def _answer(value: Any, field: str, prompt: list[dict[str, str]] | None) -> dict[str, str]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"`{field}` is empty")
        return {"role": "assistant", "content": value}
    messages = _messages(value, field)
    if prompt is not None and len(messages) > 1 and messages[:-1] == prompt:
        messages = messages[-1:]  # the full conversation was given: keep the final turn
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RecordError(f"`{field}` must be one assistant message")
    return messages[0]


def sft_record(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RecordError("not a JSON object")
    if "messages" in row:
        messages = _messages(row["messages"], "messages")
        if messages[-1]["role"] != "assistant":
            raise RecordError("`messages` must end with an assistant turn")
        prompt = check_prompt(messages[:-1]) if len(messages) > 1 else None
        if prompt is None:
            raise RecordError("`messages` has no user turn before the assistant turn")
        return {"prompt": prompt, "completion": messages[-1:]}
    for key in ("prompt", "completion"):
        if key not in row:
            raise RecordError(f"missing `{key}` (or give `messages`)")
    prompt = check_prompt(_messages(row["prompt"], "prompt"))
    return {"prompt": prompt, "completion": [_answer(row["completion"], "completion", prompt)]}


def preference_record(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RecordError("not a JSON object")
    for key in ("prompt", "chosen", "rejected"):
        if key not in row or row[key] is None:
            raise RecordError(f"missing `{key}`")
    prompt = check_prompt(_messages(row["prompt"], "prompt"))
    chosen = _answer(row["chosen"], "chosen", prompt)
    rejected = _answer(row["rejected"], "rejected", prompt)
    if chosen["content"].strip() == rejected["content"].strip():
        raise RecordError("`chosen` and `rejected` are the same text")
    return {"prompt": prompt, "chosen": [chosen], "rejected": [rejected]}


def load_records(path: Path, parse: Callable[[Any], dict], fits: Callable[[dict], str | None],
                 problems: list[Problem]) -> list[dict]:
    """The good records of one file; each bad one is appended to `problems` with its index."""
    if not path.exists():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    good = []
    for i, row in read_rows(path):
        try:
            if isinstance(row, RecordError):
                raise row
            record = parse(row)
            too_long = fits(record)
            if too_long:
                raise RecordError(too_long)
        except RecordError as e:
            problems.append(Problem(str(path), i, str(e)))
            continue
        good.append(record)
    return good
