"""Ray Serve deployment settings shared by every deployment of the app (LLMs, gateway,
moderation): replicas, autoscaling and admission limits."""

from __future__ import annotations

from pydantic import Field, model_validator

from cluster.config import CustomResources, StrictModel


class Autoscaling(StrictModel):
    """Ray Serve's `autoscaling_config` for one deployment."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=8, gt=0)
    upscale_delay_s: float = Field(default=5, ge=0)
    downscale_delay_s: float = Field(default=60, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class DeploymentLimits(StrictModel):
    """Admission limits of one deployment's replicas (Ray Serve refuses beyond them)."""

    max_ongoing_requests: int = Field(default=32, ge=1)
    max_queued_requests: int = Field(default=32, ge=-1, description="-1 = unbounded (not advised)")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    resources: CustomResources = Field(default_factory=dict, description="custom Ray resources each replica asks "
                                       "for, e.g. one that only a node pool offers, to place the replicas there")

    def serve_options(self) -> dict:
        """Ray Serve deployment options every deployment shares: autoscaling, admission, health checks."""
        a = self.autoscaling
        auto = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                "initial_replicas": a.initial_replicas, "target_ongoing_requests": a.target_ongoing_requests,
                "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
        return {"max_ongoing_requests": self.max_ongoing_requests, "max_queued_requests": self.max_queued_requests,
                "autoscaling_config": auto, "health_check_period_s": 5, "health_check_timeout_s": 30}
