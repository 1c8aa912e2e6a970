"""One way for every stage and command to reach Ray.

`--address` / the recipe's `ray.address` / `RAY_ADDRESS` join an existing cluster;
otherwise an embedded local Ray starts in this process with its dashboard bound to
127.0.0.1. The auth mode is always set explicitly: Ray 2.60 otherwise decides it from
whether a token file happens to be left in ~/.ray.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

from cluster.config import RayConfig
from cluster.errors import UserError

AUTH_ENV = "RAY_AUTH_MODE"


def ray_cli() -> str:
    """The `ray` executable of this environment."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def set_auth_mode(mode: str) -> str:
    """Use `RAY_AUTH_MODE` when the user exported it, else `mode`; return the mode in force."""
    os.environ.setdefault(AUTH_ENV, mode)
    if "ray" in sys.modules:
        # Ray caches its config at import; refresh it as Ray's own auth setup does.
        from ray._raylet import Config

        Config.initialize("")
    return os.environ[AUTH_ENV]


def has_auth_token() -> bool:
    """Whether Ray can find a token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(path)


def ensure_local_token() -> None:
    """Token auth on a cluster we start needs a token; make one the way Ray's CLI does."""
    if os.environ.get(AUTH_ENV, "").lower() == "token" and not has_auth_token():
        subprocess.run([ray_cli(), "get-auth-token", "--generate"], check=True, capture_output=True)


def dashboard_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("aiohttp", "aiohttp_cors", "opencensus"))


def connect_ray(config: RayConfig | None = None, address: str | None = None) -> str | None:
    """Connect this process to Ray (once); return the dashboard URL when there is one."""
    import ray

    config = config or RayConfig()
    if ray.is_initialized():
        return _dashboard_url()
    set_auth_mode(config.auth)
    target = address or config.address or os.environ.get("RAY_ADDRESS")
    logging.getLogger("ray").setLevel(logging.WARNING)
    try:
        if target:
            if os.environ[AUTH_ENV].lower() == "token" and not has_auth_token():
                raise UserError(
                    f"Ray at {target} needs an auth token: set RAY_AUTH_TOKEN or copy the cluster's "
                    "token to ~/.ray/auth_token (or use ray.auth: disabled for a cluster without auth)"
                )
            context = ray.init(address=target, logging_level=logging.WARNING)
            where = f"joined Ray cluster at {target}"
        else:
            ensure_local_token()
            context = ray.init(
                address="local",  # a new instance, never a `ray start` cluster (or a stale address file) on this host
                num_cpus=config.num_cpus,
                include_dashboard=config.dashboard and dashboard_available(),
                dashboard_host="127.0.0.1",
                logging_level=logging.WARNING,
            )
            where = "started an embedded local Ray"
    except (ConnectionError, ValueError) as exc:
        raise UserError(f"cannot connect to Ray at {target or 'a new local instance'}: {exc}") from None
    url = context.dashboard_url or None
    url = url if not url or url.startswith("http") else f"http://{url}"
    print(f"aero: {where}" + (f"; dashboard {url}" if url else ""), file=sys.stderr)
    return url


def _dashboard_url() -> str | None:
    from ray._private.worker import get_dashboard_url

    url = get_dashboard_url()
    if not url:
        return None
    return url if url.startswith("http") else f"http://{url}"
