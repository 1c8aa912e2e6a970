"""Per-batch functions that turn raw files into normalized documents, for `map_batches`.

Every input yields either documents or reject rows with a reason, from the same code path,
so nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path

import pandas as pd

PROSE_SUFFIXES = {".txt": "text", ".md": "markdown", ".rst": "rst"}
CODE_SUFFIXES = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".c": "c", ".h": "c",
    ".cpp": "cpp", ".java": "java", ".go": "go", ".rs": "rust", ".sh": "shell",
}
RECORD_SUFFIXES = {".jsonl", ".json"}

COLUMNS = ["doc_id", "source", "kind", "language", "text", "n_bytes", "reason"]

# Control characters other than tab and newline (C0, DEL, C1).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC (keeps Vietnamese diacritics composed), LF newlines, no control characters,
    no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def _row(doc_id: str, source: str, kind: str, language: str, text: str, reason: str = "") -> dict:
    return {
        "doc_id": doc_id, "source": source, "kind": kind, "language": language,
        "text": text, "n_bytes": len(text.encode("utf-8")), "reason": reason,
    }


def _reject(source: str, reason: str) -> dict:
    return _row(f"reject:{hashlib.sha1(source.encode()).hexdigest()[:12]}", source, "", "", "", reason)


def _document(doc_id: str, source: str, kind: str, language: str, raw: str, max_chars: int) -> dict:
    if len(raw) > max_chars:
        return _reject(source, f"too long: {len(raw)} characters > max_doc_chars {max_chars}")
    text = normalize_text(raw)
    if not text:
        return _reject(source, "empty after normalization")
    return _row(doc_id, source, kind, language, text)


def _records(path: str, text: str, text_field: str, max_chars: int) -> list[dict]:
    """JSON lines (or one JSON list/object): one document per record with a string `text_field`."""
    stripped = text.lstrip()
    if path.endswith(".json") and stripped[:1] in "[{":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return [_reject(path, f"malformed JSON: {exc}")]
        items = list(enumerate(data if isinstance(data, list) else [data], start=1))
    else:
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                items.append((lineno, exc))
    rows = []
    for lineno, item in items:
        where = f"{path}:{lineno}"
        if isinstance(item, json.JSONDecodeError):
            rows.append(_reject(where, f"malformed JSON line: {item.msg}"))
        elif not isinstance(item, dict) or not isinstance(item.get(text_field), str):
            rows.append(_reject(where, f"record has no string field {text_field!r}"))
        else:
            doc_id = str(item.get("doc_id") or item.get("id") or where)
            rows.append(_document(doc_id, where, "prose", "", item[text_field], max_chars))
    return rows


def documents_from_files(batch: pd.DataFrame, text_field: str, max_doc_chars: int) -> pd.DataFrame:
    """`read_binary_files(include_paths=True)` rows (`bytes`, `path`) -> document or reject rows."""
    rows: list[dict] = []
    for data, path in zip(batch["bytes"], batch["path"]):
        suffix = Path(path).suffix.lower()
        if b"\x00" in data[:8192]:
            rows.append(_reject(path, "binary file (NUL bytes)"))
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(_reject(path, f"invalid UTF-8 at byte {exc.start}"))
            continue
        if suffix in RECORD_SUFFIXES:
            rows.extend(_records(path, text, text_field, max_doc_chars))
        elif suffix in CODE_SUFFIXES:
            rows.append(_document(path, path, "code", CODE_SUFFIXES[suffix], text, max_doc_chars))
        elif suffix in PROSE_SUFFIXES:
            rows.append(_document(path, path, "prose", "", text, max_doc_chars))
        else:
            rows.append(_reject(path, f"unsupported file type {suffix or '(none)'}"))
    return pd.DataFrame(rows, columns=COLUMNS)
