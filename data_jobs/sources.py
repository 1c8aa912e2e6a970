"""Turns the recipe's source specs into the list of files the corpus stage reads.

Specs: a local file, folder (read recursively) or glob; `stdlib:docs` (the standard
library's pydoc topics, one document per topic: real prose on every Python install);
`stdlib:code/GLOB` (standard-library source files matching GLOB).
"""

from __future__ import annotations

import glob
import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from cluster.errors import UserError
from cluster.manifest import atomic_write_text, sha256_file

STDLIB_DOCS = "stdlib:docs"
STDLIB_CODE = "stdlib:code/"


@dataclass(frozen=True)
class SourceFiles:
    spec: str
    files: tuple[Path, ...]

    def digest(self) -> str:
        """One hash over the spec's files (relative order and contents)."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
        return h.hexdigest()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stage_pydoc_topics(target: Path) -> Path:
    """Write the stdlib's pydoc topics as JSON lines (`doc_id`, `text`) once; return the file."""
    from pydoc_data.topics import topics

    if not target.exists():
        lines = (json.dumps({"doc_id": f"pydoc:{k}", "text": v}, ensure_ascii=False) for k, v in sorted(topics.items()))
        atomic_write_text(target, "\n".join(lines) + "\n")
    return target


def resolve_source(spec: str, staging_dir: Path) -> SourceFiles:
    if spec == STDLIB_DOCS:
        return SourceFiles(spec, (stage_pydoc_topics(staging_dir / "pydoc_topics.jsonl"),))
    if spec.startswith(STDLIB_CODE):
        pattern = str(stdlib_dir() / spec[len(STDLIB_CODE):])
        files = tuple(sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()))
        if not files:
            raise UserError(f"source {spec!r}: no standard-library files match {pattern}")
        return SourceFiles(spec, files)
    if "://" in spec:
        raise UserError(f"source {spec!r}: only local paths and stdlib: sources are read so far")
    path = Path(spec)
    if path.is_file():
        return SourceFiles(spec, (path,))
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")))
    else:
        files = tuple(sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file()))
    if not files:
        raise UserError(f"source {spec!r}: no such file, or the folder/glob matches no files")
    return SourceFiles(spec, files)
