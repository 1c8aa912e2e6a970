"""The `serve.moderation` section: what is screened, the policy per category, direction and
chat role (the shipped `policy.yaml`, a deployer's policy file over it, the recipe's inline
overrides over both), thresholds, the classifier and optional guard model, and the moderation
deployment's limits."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_serializer, field_validator, model_validator

from cluster.config import StrictModel
from cluster.errors import UserError
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


class RolePolicy(StrictModel):
    """How a chat message of one role is screened; unset fields keep the layer below."""

    screen: list[str] | None = Field(default=None, description="categories screened (default: all)")
    thresholds: dict[str, float] = Field(default_factory=dict,
                                         description="per-category thresholds in this role (1.0: rule hits only)")
    ignore_rules: list[str] = Field(default_factory=list, description="rule kinds that do not count in this role")

    @model_validator(mode="after")
    def _known(self) -> "RolePolicy":
        from serve.moderation.rules import RULE_KINDS

        for cat in [*(self.screen or []), *self.thresholds]:
            if cat not in CATEGORIES:
                raise ValueError(f"unknown moderation category {cat!r} (known: {', '.join(CATEGORIES)})")
        for cat, t in self.thresholds.items():
            if not 0 < t <= 1:
                raise ValueError(f"threshold of {cat} is {t}; it must be in (0, 1]")
        unknown = [k for k in self.ignore_rules if k not in RULE_KINDS]
        if unknown:
            raise ValueError(f"unknown rule kinds {unknown} (known: {', '.join(RULE_KINDS)})")
        return self


def _check_categories(v: dict[str, CategoryPolicy]) -> dict[str, CategoryPolicy]:
    for cat, p in v.items():
        if cat not in CATEGORIES:
            raise ValueError(f"unknown moderation category {cat!r} (known: {', '.join(CATEGORIES)})")
        if Action.redact in (p.input, p.output) and cat not in _REDACTABLE:
            raise ValueError(f"{cat}: only {sorted(_REDACTABLE)} can be redacted (they have spans); use block or log")
    return v


class PolicyFile(StrictModel):
    """A policy file: per-category actions and thresholds, per-role screening."""

    categories: dict[str, CategoryPolicy] = Field(default_factory=dict)
    roles: dict[str, RolePolicy] = Field(default_factory=dict)

    @field_validator("categories")
    @classmethod
    def known_categories(cls, v: dict[str, CategoryPolicy]) -> dict[str, CategoryPolicy]:
        return _check_categories(v)


SHIPPED_POLICY = Path(__file__).with_name("policy.yaml")


def read_policy(path: str | Path) -> PolicyFile:
    """A policy file, or a UserError naming the file and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"moderation policy file {path} does not exist")
    try:
        return PolicyFile.model_validate(yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError as exc:
        raise UserError(f"moderation policy file {path} is not valid YAML: {exc}") from None
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"moderation policy file {path}: {where}") from None


def _over(base: StrictModel, top: StrictModel | None) -> StrictModel:
    """`base` with the fields `top` sets."""
    return base if top is None else base.model_copy(update=top.model_dump(exclude_unset=True))


class ModerationConfig(StrictModel):
    enabled: bool = True
    classifier: str = Field(default="moderation",
                            description="stage name (its `classifier` output) or a folder with classifier.safetensors")
    classifier_threshold: float | None = Field(
        default=None, gt=0, le=1, description="a text whose probability of being harmful (1 - P(benign)) reaches "
                                              "this is flagged in its most likely category (default: the operating "
                                              "point the `moderation` stage chose by cross-validation)")
    policy_file: str | None = Field(default=None, description="a policy file laid over the shipped "
                                                               "serve/moderation/policy.yaml (same shape)")
    policy: dict[str, CategoryPolicy] = Field(default_factory=dict, description="per-category overrides, over "
                                                                                "the policy files")
    roles: dict[str, RolePolicy] = Field(default_factory=dict, description="per-role overrides (system, developer, "
                                                                           "user, ...), over the policy files")
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

    _layers: list[PolicyFile] = PrivateAttr(default_factory=list)

    @field_validator("policy")
    @classmethod
    def known_categories(cls, v: dict[str, CategoryPolicy]) -> dict[str, CategoryPolicy]:
        return _check_categories(v)

    @field_serializer("policy", "roles")
    def overrides_only(self, v: dict[str, StrictModel]) -> dict[str, dict]:
        """Only what an override sets, so a dumped and reloaded config lays the same overrides."""
        return {k: p.model_dump(mode="json", exclude_unset=True) for k, p in v.items()}

    @model_validator(mode="after")
    def _read_policy_files(self) -> "ModerationConfig":
        self._layers = [read_policy(SHIPPED_POLICY)] + ([read_policy(self.policy_file)] if self.policy_file else [])
        self._layers.append(PolicyFile.model_construct(categories=self.policy, roles=self.roles))
        return self

    def rule(self, category: str) -> CategoryPolicy:
        """The effective policy of one category: block in and out, with the layers' overrides."""
        out = CategoryPolicy(input=Action.block, output=Action.block)
        for layer in self._layers:
            out = _over(out, layer.categories.get(category))
        return out

    def role(self, role: str | None) -> RolePolicy:
        """How a message of `role` is screened (a role no layer names, or none: every category)."""
        out = RolePolicy()
        for layer in self._layers:
            out = _over(out, layer.roles.get(role)) if role else out
        return out
