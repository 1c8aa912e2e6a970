"""The `serve.moderation` section: what is screened, the policy per category and direction,
thresholds, the classifier and optional guard model, and the moderation deployment's limits."""

from __future__ import annotations

from enum import Enum

from pydantic import Field, field_validator

from cluster.config import StrictModel
from serve.deployment_config import Autoscaling, DeploymentLimits

# OpenAI's moderation categories (omni-moderation), then ours.
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors",
    "violence", "violence/graphic",
)
OWN_CATEGORIES = ("pii", "secrets", "prompt_injection")
CATEGORIES = OPENAI_CATEGORIES + OWN_CATEGORIES
# A sub-category implies its parent (a threat is also harassment).
PARENT = {c: c.split("/")[0] for c in OPENAI_CATEGORIES if "/" in c}
PARENT["self-harm/intent"] = PARENT["self-harm/instructions"] = "self-harm"


class Action(str, Enum):
    block = "block"    # input: 400 (or the refusal message); output: the text is withheld
    redact = "redact"  # PII and secrets are replaced by placeholders (rule categories only)
    log = "log"        # counted and audited, nothing changes


_REDACTABLE = {"pii", "secrets"}


class CategoryPolicy(StrictModel):
    """What happens when a category is flagged; unset fields keep the default policy."""

    input: Action | None = None
    output: Action | None = None
    threshold: float | None = Field(default=None, gt=0, le=1,
                                    description="score at which the category is flagged (default: the classifier's "
                                                "operating point; 0.5 for pii and secrets, which only rules score)")


def default_policy(category: str) -> CategoryPolicy:
    """No threshold for a learned category: a fixed 0.5 would flag, below the operating point the
    `moderation` stage calibrated, texts that P(not benign) lets through."""
    if category in _REDACTABLE:
        return CategoryPolicy(input=Action.redact, output=Action.redact, threshold=0.5)
    if category == "prompt_injection":  # a model that repeats an injection is not itself harmful
        return CategoryPolicy(input=Action.block, output=Action.log)
    return CategoryPolicy(input=Action.block, output=Action.block)


class ModerationConfig(StrictModel):
    enabled: bool = True
    classifier: str = Field(default="moderation",
                            description="stage name (its `classifier` output) or a folder with classifier.safetensors")
    classifier_threshold: float | None = Field(
        default=None, gt=0, le=1, description="a text whose probability of being harmful (1 - P(benign)) reaches "
                                              "this is flagged in its most likely category (default: the operating "
                                              "point the `moderation` stage chose by cross-validation)")
    policy: dict[str, CategoryPolicy] = Field(default_factory=dict, description="per-category overrides")
    refusal_message: str | None = Field(
        default=None, description="when set, a blocked input is answered with this text (finish_reason "
                                  "content_filter) instead of a 400 error")
    output_window_chars: int = Field(default=96, ge=16, le=4096,
                                     description="streamed text is held back and screened in windows of this size")
    max_input_chars: int = Field(default=32_000, ge=256, description="longer inputs are refused (400) unscreened")
    guard_model: str | None = Field(default=None, description="optional Llama-Guard-style model: stage name or folder")
    guard_max_new_tokens: int = Field(default=12, ge=1, le=64)
    audit_log: str | None = Field(default=None, description="JSONL audit log (default: the serve stage folder)")
    deployment: DeploymentLimits = Field(default_factory=lambda: DeploymentLimits(
        max_ongoing_requests=64, max_queued_requests=128, num_cpus=0.5,
        autoscaling=Autoscaling(min_replicas=1, max_replicas=2, target_ongoing_requests=16)))

    @field_validator("policy")
    @classmethod
    def _known(cls, v: dict[str, CategoryPolicy]) -> dict[str, CategoryPolicy]:
        for cat, p in v.items():
            if cat not in CATEGORIES:
                raise ValueError(f"unknown moderation category {cat!r} (known: {', '.join(CATEGORIES)})")
            if Action.redact in (p.input, p.output) and cat not in _REDACTABLE:
                raise ValueError(f"{cat}: only {sorted(_REDACTABLE)} can be redacted (they have spans); "
                                 f"use block or log")
        return v

    def rule(self, category: str) -> CategoryPolicy:
        """The effective policy of one category: the default with the recipe's overrides."""
        base = default_policy(category)
        over = self.policy.get(category)
        if over is None:
            return base
        return base.model_copy(update={k: v for k, v in over.model_dump().items() if v is not None})
