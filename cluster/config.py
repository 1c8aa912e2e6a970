"""Recipes: YAML files that name a run, its folder, its stages and each stage's config.

A recipe's top level has a few fixed keys (`run`, `runs_dir`, `ray`, `stages`, `storage`);
every other key is the section of one stage, validated by that stage's own
pydantic model (found through `cluster.stages`). Overrides `a.b=value` are
applied to the raw YAML before validation, so they meet the same checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from cluster.errors import ConfigError


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, not silent no-ops."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    both = {"CPU", "GPU"} & set(value)
    if both:
        raise ValueError(f"{' and '.join(sorted(both))} {'are' if len(both) == 2 else 'is'} set with this section's "
                         "own keys, not here: list only custom resources")
    if any(v <= 0 for v in value.values()):
        raise ValueError(f"every amount must be > 0, got {value}")
    return value


# Custom Ray resources a task, worker or replica asks for (e.g. one that only a node pool offers).
CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


class RayConfig(StrictModel):
    """How a run reaches Ray. `address: null` and no RAY_ADDRESS starts an embedded local Ray."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    dashboard: bool = True
    # Ray 2.60 turns token auth on for new local clusters when the mode is unset,
    # and also when a token file is left over. We always set it explicitly.
    auth: Literal["token", "disabled"] = "token"


_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Recipe(StrictModel):
    run: str
    runs_dir: Path = Path("runs")
    ray: RayConfig = RayConfig()
    stages: list[str] = Field(default_factory=list)
    # An artifact store URI (s3://, gs://, hdfs://, file://...): finished stage folders are
    # mirrored there and Ray Train/Tune checkpoint there (see cluster/artifact_store.py).
    storage: str | None = None
    # KubeRay manifests' settings (`aero cluster k8s`; validated by cluster/k8s.py's KubernetesConfig).
    kubernetes: dict[str, Any] | None = None
    # Validated stage sections, keyed by stage name (filled by load_recipe).
    stage_configs: dict[str, Any] = Field(default_factory=dict, exclude=True)
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("run")
    @classmethod
    def _run_is_a_folder_name(cls, value: str) -> str:
        if not _RUN_NAME.match(value):
            raise ValueError("must be a folder name: letters, digits, '.', '_' or '-'")
        return value

    @field_validator("storage")
    @classmethod
    def _storage_is_a_uri(cls, value: str | None) -> str | None:
        if value is not None and "://" not in value:
            raise ValueError("must be a URI such as s3://bucket/prefix or file:///shared/runs "
                             "(for a shared folder, point runs_dir at it instead)")
        return value

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.run

    def stage_config(self, name: str) -> Any:
        """The validated config of stage `name` (its defaults when the recipe has no section)."""
        if name not in self.stage_configs:
            from cluster.stages import load_stage

            self.stage_configs[name] = load_stage(name).config_model()
        return self.stage_configs[name]


RECIPE_KEYS = ("run", "runs_dir", "ray", "stages", "storage", "kubernetes")


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as YAML (`3`, `true`, `[1, 2]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    parts = key.strip().split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override {text!r}: empty part in key path {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key.sub=value` in `data` (in place), creating missing sections."""
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r}: {where} is a {type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
    return data


def nested(dotted: dict[str, Any]) -> dict[str, Any]:
    """{"model.overrides.hidden_size": 64} -> {"model": {"overrides": {"hidden_size": 64}}}."""
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        out = deep_merge(out, _one(key.split("."), value))
    return out


def _one(parts: list[str], value: Any) -> dict[str, Any]:
    return {parts[0]: value} if len(parts) == 1 else {parts[0]: _one(parts[1:], value)}


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `overlay`'s keys merged in, sections merged recursively."""
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def format_validation_error(source: str, prefix: str, exc: ValidationError) -> str:
    """One line per problem: `file: key.path: what was expected (got ...)`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required key is missing"
        elif "input" in err and not isinstance(err["input"], dict):
            message += f" (got {err['input']!r})"
        lines.append(f"{source}: {loc or '<top>'}: {message}")
    return "; ".join(lines)


def validate_section(model: type[BaseModel], data: Any, *, source: str, prefix: str) -> BaseModel:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix}: expected a mapping, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, prefix, exc)) from None


def build_recipe(data: dict[str, Any], *, source: str = "<recipe>") -> Recipe:
    """Validate a raw recipe mapping: fixed keys by `Recipe`, stage sections by their stage."""
    from cluster.stages import STAGE_TABLE, load_stage

    fixed = {k: v for k, v in data.items() if k in RECIPE_KEYS}
    sections = {k: v for k, v in data.items() if k not in RECIPE_KEYS}
    for key in sections:
        if key not in STAGE_TABLE:
            expected = ", ".join([*RECIPE_KEYS, *STAGE_TABLE])
            raise ConfigError(f"{source}: {key}: unknown key (expected one of: {expected})")
    try:
        recipe = Recipe.model_validate(fixed)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, "", exc)) from None
    for i, name in enumerate(recipe.stages):
        if name not in STAGE_TABLE:
            raise ConfigError(
                f"{source}: stages.{i}: unknown stage {name!r} (known: {', '.join(STAGE_TABLE)})"
            )
    if len(set(recipe.stages)) != len(recipe.stages):
        raise ConfigError(f"{source}: stages: a stage is listed twice")
    for name, section in sections.items():
        recipe.stage_configs[name] = validate_section(
            load_stage(name).config_model, section, source=source, prefix=name
        )
    recipe.source = Path(source) if source != "<recipe>" else None
    return recipe


def load_recipe(
    path: Path | str, overrides: list[str] | None = None, overlays: list[Path] | None = None
) -> Recipe:
    """Read, overlay, override and validate a recipe; every error names file and key."""
    path = Path(path)
    data = read_yaml(path)
    for overlay in overlays or []:
        data = deep_merge(data, read_yaml(Path(overlay)))
    apply_overrides(data, list(overrides or []))
    return build_recipe(data, source=str(path))
