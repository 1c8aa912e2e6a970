"""The moderation deployment: its own Ray Serve replicas (and autoscaling), called by the
gateway on every input and on generated output through a `DeploymentHandle`.

Concurrent calls are grouped by `@serve.batch`, so the embedding model runs once per batch of
texts; decisions are counted in Prometheus metrics and written to the audit log.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve


class ModerationServer:
    def __init__(self, config: dict[str, Any], classifier_dir: str, guard_dir: str | None = None,
                 audit_path: str | None = None):
        from ray.serve import metrics

        from serve.moderation.audit import AuditLog
        from serve.moderation.moderation_config import ModerationConfig
        from serve.moderation.moderator import Moderator

        self.cfg = ModerationConfig.model_validate(config)
        self.moderator = Moderator(self.cfg, classifier_dir, guard_dir)
        self.moderator.screen(["warm up"], "input")
        self.audit = AuditLog(audit_path)
        self.decisions = metrics.Counter("aero_moderation_decisions", description="flagged categories by action",
                                         tag_keys=("direction", "category", "action"))
        self.screened = metrics.Counter("aero_moderation_screened", description="texts screened, by overall action",
                                        tag_keys=("direction", "action"))
        self.latency = metrics.Histogram("aero_moderation_latency_s", description="seconds per screen call",
                                         boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1], tag_keys=("direction",))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _classify(self, texts: list[str]) -> list:
        rows = await asyncio.to_thread(self.moderator.classify, texts)
        return list(rows)

    async def screen(self, texts: list[str], direction: str, context: dict[str, Any] | None = None,
                     roles: list[str] | None = None) -> list[dict]:
        """One verdict per text (see `Verdict`); direction is input, output or api; `roles` are the
        chat messages' roles, when the texts are messages."""
        import numpy as np

        started = time.monotonic()
        rows = await asyncio.gather(*[self._classify(t) for t in texts])
        policy_direction = "output" if direction == "output" else "input"
        verdicts = [v.to_dict() for v in self.moderator.screen(texts, policy_direction, np.stack(rows) if rows else None,
                                                              roles)]
        for i, (text, v) in enumerate(zip(texts, verdicts)):
            self.screened.inc(tags={"direction": direction, "action": v["action"]})
            for c, action in v["actions"].items():
                self.decisions.inc(tags={"direction": direction, "category": c, "action": action})
            where = {"index": i, **({"role": roles[i]} if roles else {})}
            self.audit.write(text=text, direction=direction, verdict=v, context={**(context or {}), **where})
        self.latency.observe(time.monotonic() - started, tags={"direction": direction})
        return verdicts

    async def check_health(self) -> None:
        await self._classify("health")  # through the batch: the moderator's cache is used by one thread
