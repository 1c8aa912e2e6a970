"""The `serve.qa` section: the Q&A endpoint (`POST /v1/qa`) and page (`/qa`)."""

from __future__ import annotations

from pydantic import Field

from cluster.config import StrictModel
from serve.deployment_config import Autoscaling, DeploymentLimits


class QAConfig(StrictModel):
    index: str | None = Field(default=None, description="the `qa_index` stage (its `index` output) or an index "
                                                        "folder; unset: Q&A is off")
    model: str | None = Field(default=None, description="the model that answers (default: the first one served)")
    template: str = Field(default="qa.v1", description="prompt template (name.vN) with {passages} and {question}")
    k: int = Field(default=5, ge=1, le=20, description="passages retrieved per question")
    max_question_chars: int = Field(default=4000, ge=16)
    max_tokens: int = Field(default=64, ge=1)
    deployment: DeploymentLimits = Field(default_factory=lambda: DeploymentLimits(
        max_ongoing_requests=64, max_queued_requests=128, num_cpus=0.25,
        autoscaling=Autoscaling(min_replicas=1, max_replicas=2, target_ongoing_requests=16)))
