"""Run manifests: what a stage ran with, what it read, what it wrote, and whether it finished.

A manifest is written atomically (temp file in the same folder, fsync, rename), so a stage
killed at any moment leaves either the previous manifest or the new one, never a torn file
and never `finished` for unfinished work. Later stages read their inputs from earlier
manifests; following those links gives the lineage of every artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

MANIFEST_NAME = "manifest.json"

Status = Literal["running", "finished", "failed"]


class Artifact(BaseModel):
    path: str
    sha256: str


class Manifest(BaseModel):
    stage: str
    run: str
    status: Status
    fingerprint: str
    config: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict)
    outputs: dict[str, Artifact] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str | None] = Field(default_factory=dict)
    git_commit: str | None = None
    started_at: str
    ended_at: str | None = None
    error: str | None = None
    # The stage folder's copy in the recipe's artifact store, when it has one.
    stored_at: str | None = None

    @property
    def output_id(self) -> str:
        """What a later stage depends on: this stage's fingerprint and the hashes of what it
        wrote, so a rerun that writes something else (new code, same config) reruns it too."""
        parts = [self.fingerprint] + [f"{k}={a.sha256}" for k, a in sorted(self.outputs.items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(stage_dir: Path, manifest: Manifest) -> Path:
    path = Path(stage_dir) / MANIFEST_NAME
    atomic_write_text(path, manifest.model_dump_json(indent=2) + "\n")
    return path


def read_manifest(stage_dir: Path) -> Manifest | None:
    """The stage's manifest, or None if there is none or it cannot be read as one."""
    path = Path(stage_dir) / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (ValidationError, ValueError, OSError):
        return None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a folder's sorted (relative path, file hash) list."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder to hash")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


def file_hashes(paths, setting: str) -> dict[str, str]:
    """sha256 of each file a stage reads from outside the run, keyed by its path; a missing
    one is a user error naming the config `setting` that points at it."""
    from cluster.errors import UserError

    out = {}
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{setting}: {path} does not exist")
        out[str(path)] = sha256_file(Path(path))
    return out


def fingerprint(stage: str, config: dict[str, Any], inputs: dict[str, str]) -> str:
    """What decides whether a finished stage can be skipped: its name, config and input hashes."""
    payload = json.dumps({"stage": stage, "config": config, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
