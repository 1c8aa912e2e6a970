"""Turns the recipe's source specs into the files the corpus stage reads, with their sizes.

Specs: a local file, folder (read recursively) or glob; a URI that pyarrow's filesystems
understand (`file:///...`, `s3://bucket/prefix`, `gs://...`), listed recursively;
`stdlib:docs` (the standard library's pydoc topics, one document per topic: real prose
on every Python install); `stdlib:code/GLOB` (standard-library source files).
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
class SourceFile:
    path: str
    size: int
    mtime_ns: int | None = None  # for URIs, whose content is not hashed


@dataclass(frozen=True)
class SourceFiles:
    spec: str
    files: tuple[SourceFile, ...]

    def digest(self) -> str:
        """One hash over the spec's files: contents for local files, size and mtime for URIs."""
        h = hashlib.sha256()
        for f in self.files:
            if "://" in f.path:
                h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
            else:
                try:
                    h.update(f"{Path(f.path).name}\0{sha256_file(Path(f.path))}\n".encode())
                except OSError as exc:  # unreadable files are reported by the stage, per file
                    h.update(f"{f.path}\0unreadable {exc.errno}\n".encode())
        return h.hexdigest()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stage_pydoc_topics(target: Path) -> Path:
    """Write the stdlib's pydoc topics as JSON lines (`topic`, `text`) once; return the file."""
    from pydoc_data.topics import topics

    if not target.exists():
        lines = (json.dumps({"topic": k, "text": v}, ensure_ascii=False) for k, v in sorted(topics.items()))
        atomic_write_text(target, "\n".join(lines) + "\n")
    return target


def _local(paths) -> tuple[SourceFile, ...]:
    out = []
    for p in sorted(set(paths)):
        try:
            out.append(SourceFile(str(p), Path(p).stat().st_size))
        except OSError:
            out.append(SourceFile(str(p), 0))
    return tuple(out)


def _uri(spec: str) -> tuple[SourceFile, ...]:
    from pyarrow import fs

    try:
        filesystem, root = fs.FileSystem.from_uri(spec)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.File:
            infos = [info]
        elif info.type == fs.FileType.Directory:
            infos = [i for i in filesystem.get_file_info(fs.FileSelector(root, recursive=True)) if i.type == fs.FileType.File]
        else:
            infos = []
    except (OSError, ValueError) as exc:
        raise UserError(f"source {spec!r}: cannot list it: {' '.join(str(exc).split())[:300]}") from None
    scheme = spec.split("://", 1)[0]
    files = [SourceFile(f"{scheme}://{i.path}", i.size or 0, i.mtime_ns) for i in infos if not i.base_name.startswith(".")]
    return tuple(sorted(files, key=lambda f: f.path))


def resolve_source(spec: str, staging_dir: Path) -> SourceFiles:
    if spec == STDLIB_DOCS:
        return SourceFiles(spec, _local([stage_pydoc_topics(staging_dir / "pydoc_topics.jsonl")]))
    if spec.startswith(STDLIB_CODE):
        pattern = str(stdlib_dir() / spec[len(STDLIB_CODE):])
        files = _local(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"source {spec!r}: no standard-library files match {pattern}")
        return SourceFiles(spec, files)
    if "://" in spec:
        files = _uri(spec)
        if not files:
            raise UserError(f"source {spec!r}: no such file, or the folder matches no files")
        return SourceFiles(spec, files)
    path = Path(spec)
    if path.is_file():
        files = _local([path])
    elif path.is_dir():
        # Broken links are listed too: the stage reports them as unreadable instead of skipping them.
        files = _local(p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith("."))
    else:
        files = _local(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise UserError(f"source {spec!r}: no such file, or the folder/glob matches no files")
    return SourceFiles(spec, files)
