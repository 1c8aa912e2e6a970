"""Starting and stopping Ray clusters: a local head with `ray start`, or a cloud cluster from
`ray_cluster.yaml` with Ray's cluster launcher (`ray up`). The cluster file is checked with
Ray's own validation (what `ray up` runs) before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cluster.config import RayConfig, read_yaml
from cluster.errors import ConfigError, UserError
from cluster.ray_session import connect_ray, ensure_local_token, ray_cli, set_auth_mode


def validate_cluster_file(path: Path) -> dict[str, Any]:
    """Load and validate a cluster-launcher file as `ray up` would; return the prepared config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = read_yaml(Path(path))
    try:
        prepared = prepare_config(raw)
        validate_config(prepared)
    except Exception as exc:  # Ray raises ValueError, jsonschema errors, KeyError...
        message = " ".join(str(exc).split())
        raise ConfigError(f"{path}: rejected by Ray's cluster-config validation: {message[:500]}") from None
    return prepared


def _run(cmd: list[str], env: dict[str, str]) -> None:
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
    if result.returncode != 0:
        raise UserError(f"{' '.join(cmd[:3])} failed with exit code {result.returncode}")


def cluster_up(*, config_file: Path | None, port: int, dashboard_port: int, num_cpus: int | None, auth: str) -> str:
    """Start a local head (dashboard on 127.0.0.1) or launch the cluster file; return the dashboard URL."""
    set_auth_mode(auth)
    ensure_local_token()
    env = dict(os.environ)
    if config_file is not None:
        validate_cluster_file(config_file)
        _run([ray_cli(), "up", "-y", "--no-config-cache", str(config_file)], env)
        return "see `ray dashboard " + str(config_file) + "`"
    cmd = [
        ray_cli(), "start", "--head", f"--port={port}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    _run(cmd, env)
    return f"http://127.0.0.1:{dashboard_port}"


def cluster_down(*, config_file: Path | None) -> None:
    if config_file is not None:
        validate_cluster_file(config_file)
        _run([ray_cli(), "down", "-y", str(config_file)], dict(os.environ))
    else:
        _run([ray_cli(), "stop"], dict(os.environ))


def cluster_status(address: str | None) -> dict[str, Any]:
    """Nodes, total and free resources, and the dashboard URL of the cluster at `address`."""
    import ray

    url = connect_ray(RayConfig(address=address or os.environ.get("RAY_ADDRESS") or "auto"))
    nodes = [
        {"node_id": n["NodeID"][:12], "address": n["NodeManagerAddress"], "alive": n["Alive"],
         "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
        for n in ray.nodes()
    ]
    return {
        "dashboard": url,
        "nodes": nodes,
        "total": {k: v for k, v in ray.cluster_resources().items() if not k.startswith("node:")},
        "available": {k: v for k, v in ray.available_resources().items() if not k.startswith("node:")},
    }


def status_text(info: dict[str, Any]) -> str:
    """`aero cluster status`: what cluster_status returned, one line per node."""
    lines = [f"dashboard: {info['dashboard'] or '(none)'}"]
    for node in info["nodes"]:
        state = "alive" if node["alive"] else "dead"
        lines.append(f"node {node['node_id']} {node['address']} {state} {json.dumps(node['resources'])}")
    lines += [f"total: {json.dumps(info['total'])}", f"available: {json.dumps(info['available'])}"]
    return "\n".join(lines)

