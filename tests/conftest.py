"""One real Ray cluster per test session, started the way users start one: `aero cluster up`.

Tests that run stages in-process join it through RAY_ADDRESS; job-submission tests reach
its dashboard. It is stopped with `aero cluster down` at the end of the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AERO = [sys.executable, "-m", "cluster.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aero(*args: str, cwd: Path = REPO, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `aero` CLI in a subprocess."""
    return subprocess.run(
        [*AERO, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def ray_cluster():
    port, dashboard_port = free_port(), free_port()
    os.environ["RAY_AUTH_MODE"] = "token"
    up = aero("cluster", "up", f"--port={port}", f"--dashboard-port={dashboard_port}", "--num-cpus=2")
    assert up.returncode == 0, up.stderr + up.stdout
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    aero("cluster", "down")


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A few good documents, one Vietnamese, one code file, one JSON-lines file."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "vi.md").write_text("Tiếng Việt có dấu: sắc, huyền, hỏi, ngã, nặng.\n", encoding="utf-8")
    (root / "note.txt").write_text("Ray Data streams blocks through map_batches.\r\n\r\n\r\n\r\nEnd.  \n")
    (root / "tool.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "records.jsonl").write_text('{"id": "r1", "text": "first record"}\n{"id": "r2", "text": "second record"}\n')
    return root


# Quality filters off: tests of the runner use documents too short to pass as good prose.
LENIENT_QUALITY = """  quality:
    gopher_quality: {enabled: false}
    gopher_repetition: {enabled: false}
    c4: {enabled: false}
    language: {enabled: false}
"""


def write_recipe(path: Path, *, run: str, runs_dir: Path, sources: list[str], extra: str = "") -> Path:
    lines = [f"run: {run}", f"runs_dir: {runs_dir}", "stages: [data]", "data:", "  sources:"]
    lines += [f"    - '{s}'" for s in sources]
    path.write_text("\n".join(lines) + "\n" + LENIENT_QUALITY + extra)
    return path
