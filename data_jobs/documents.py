"""Reading files into documents, for `map_batches`: one row per document or per rejected
record, with a reason, from the same code path, so nothing is dropped silently.

Formats: .txt/.md/.rst (prose), .html/.htm (main text by trafilatura), .jsonl/.json and
.parquet (one document per record, text in a configurable field), source code (kept as
code, tagged with its language). Paths may be local or URIs pyarrow's filesystems read.
"""

from __future__ import annotations

import io
import json
import re
import unicodedata
from pathlib import PurePosixPath

PROSE_SUFFIXES = {".txt": "text", ".md": "markdown", ".rst": "rst"}
HTML_SUFFIXES = {".html", ".htm"}
CODE_SUFFIXES = {
    ".py": "python", ".js": "javascript", ".ts": "typescript", ".c": "c", ".h": "c",
    ".cpp": "cpp", ".cc": "cpp", ".hpp": "cpp", ".java": "java", ".go": "go", ".rs": "rust",
    ".sh": "shell", ".rb": "ruby", ".sql": "sql", ".toml": "toml", ".yaml": "yaml", ".yml": "yaml",
}
RECORD_SUFFIXES = {".jsonl", ".json", ".parquet"}

# Control characters other than tab and newline (C0, DEL, C1).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
_MOJIBAKE_HINT = re.compile("[ÃÂâ€Ð][\x80-\xbf€™œ\u201a-\u201e\u2020-\u2026]|Ã.|â€")


def normalize_text(text: str) -> str:
    """Mojibake repaired (ftfy), NFC (keeps Vietnamese diacritics composed), LF newlines,
    no control characters, no trailing spaces, at most one blank line in a row."""
    if _MOJIBAKE_HINT.search(text):
        import ftfy

        # Only encoding repairs: quotes, ligatures, widths and HTML entities stay as written.
        text = ftfy.fix_text(
            text, unescape_html=False, uncurl_quotes=False, fix_latin_ligatures=False,
            fix_character_width=False, normalization="NFC",
        )
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def read_bytes(path: str) -> bytes:
    if "://" in path:
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _html_main_text(html: str) -> str | None:
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=True, favor_precision=True)


def _records(path: str, data: bytes, text: str | None, text_field: str):
    """Yield (where, record-or-error) for JSON lines, a JSON list/object, or parquet rows."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises several types for corrupt files
            yield path, ValueError(f"unreadable parquet: {exc}")
            return
        if text_field not in table.column_names:
            yield path, ValueError(f"parquet has no column {text_field!r}")
            return
        for i, value in enumerate(table.column(text_field).to_pylist()):
            yield f"{path}:{i}", {text_field: value}
        return
    assert text is not None
    if path.endswith(".json") and text.lstrip()[:1] in "[{":
        try:
            data_obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield path, ValueError(f"malformed JSON: {exc.msg} at line {exc.lineno}")
            return
        for i, item in enumerate(data_obj if isinstance(data_obj, list) else [data_obj]):
            yield f"{path}:{i}", item
        return
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as exc:
            yield f"{path}:{lineno}", ValueError(f"malformed JSON line: {exc.msg}")


def raw_documents(path: str, size: int, text_field: str, max_doc_chars: int):
    """Yield (doc_id, kind, language, raw_text, None) for documents and
    (source, "", "", "", reason) for rejects, for one file."""
    suffix = PurePosixPath(path).suffix.lower()
    if suffix not in RECORD_SUFFIXES | HTML_SUFFIXES | CODE_SUFFIXES.keys() | PROSE_SUFFIXES.keys():
        yield path, "", "", "", f"ingest: unsupported file type {suffix or '(none)'}"
        return
    if suffix not in RECORD_SUFFIXES and size > 4 * max_doc_chars:
        yield path, "", "", "", f"ingest: file of {size} bytes is over the document limit (max_doc_chars {max_doc_chars})"
        return
    try:
        data = read_bytes(path)
    except OSError as exc:
        yield path, "", "", "", f"ingest: unreadable: {exc.strerror or exc}"
        return
    text = None
    if suffix != ".parquet":
        if b"\x00" in data[:8192]:
            yield path, "", "", "", "ingest: binary file (NUL bytes)"
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield path, "", "", "", f"ingest: invalid UTF-8 at byte {exc.start}"
            return
    if suffix in RECORD_SUFFIXES:
        for where, item in _records(path, data, text, text_field):
            if isinstance(item, Exception):
                yield where, "", "", "", f"ingest: {item}"
            elif not isinstance(item, dict) or not isinstance(item.get(text_field), str):
                yield where, "", "", "", f"ingest: record has no string field {text_field!r}"
            else:
                yield where, "prose", "", item[text_field], None
    elif suffix in HTML_SUFFIXES:
        main = _html_main_text(text)
        if not main:
            yield path, "", "", "", "ingest: no main text found in HTML"
        else:
            yield path, "html", "", main, None
    elif suffix in CODE_SUFFIXES:
        yield path, "code", CODE_SUFFIXES[suffix], text, None
    else:
        yield path, "prose", "", text, None
