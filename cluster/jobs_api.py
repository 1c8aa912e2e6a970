"""Submitting stages and pipelines as Ray jobs through the Ray Jobs API.

The job ships the project folder as its `working_dir` and, by default, pip-installs the
project from it into the job's environment (Ray's pip plugin builds a virtualenv on top
of the node's site-packages, so dependencies already on the node are reused).
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from cluster.ray_session import set_auth_mode
from cluster.versions import PROJECT_ROOT

DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
SHIP_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache", "bench/out"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def dashboard_address(address: str | None) -> str:
    """`--address`, else RAY_ADDRESS when it is an http URL, else the local dashboard."""
    env = os.environ.get("RAY_ADDRESS", "")
    address = address or (env if env.startswith("http") else None) or DEFAULT_DASHBOARD
    return address.rstrip("/")


def job_client(address: str | None, auth: str = "token"):
    from ray.job_submission import JobSubmissionClient

    set_auth_mode(auth)
    target = dashboard_address(address)
    # Ray's client lets RAY_ADDRESS override the address it is given (as ray.init does), so an
    # explicit --address would silently go to RAY_ADDRESS's cluster; RAY_API_SERVER_ADDRESS
    # ranks above RAY_ADDRESS, so it carries the explicit address while the client resolves it.
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    if address:
        os.environ["RAY_API_SERVER_ADDRESS"] = target
    try:
        return JobSubmissionClient(target)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UserError(f"cannot reach the Ray Jobs API at {target}: {' '.join(str(exc).split())[:300]}") from None
    finally:
        if address and saved is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        elif address:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def runtime_env(install: bool) -> dict[str, Any]:
    env: dict[str, Any] = {"working_dir": str(PROJECT_ROOT), "excludes": SHIP_EXCLUDES}
    if install:
        env["pip"] = ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
    env["env_vars"] = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "token")}
    return env


def shipped_path(path: Path) -> str:
    """`path` relative to the project folder, as the job will see it; the config must travel with it."""
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        raise UserError(
            f"{path}: a submitted config must be inside the project folder {PROJECT_ROOT}, "
            "which is what is shipped to the cluster"
        ) from None


def entrypoint(command: list[str]) -> str:
    return " ".join(shlex.quote(part) for part in ["python", "-m", "cluster.cli", *command])


def submit(command: list[str], *, address: str | None, install: bool, auth: str) -> str:
    client = job_client(address, auth)
    return client.submit_job(entrypoint=entrypoint(command), runtime_env=runtime_env(install))


def wait_for(client, job_id: str, timeout_s: float | None = None) -> str:
    start = time.monotonic()
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            return status
        time.sleep(1.0)


def follow_logs(client, job_id: str) -> None:
    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(_tail())
