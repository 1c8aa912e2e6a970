"""The typed config of stage `tune`: a search space over any field of a training stage's
config (dotted paths), the scheduler, the searcher and the budget. The space is checked
against the tuned stage's own config model, so a misspelt field is an error, not a no-op."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cluster.config import StrictModel, deep_merge, nested
from cluster.errors import ConfigError


class Param(StrictModel):
    """Exactly one of: loguniform/uniform [low, high], randint [low, high) , choice [values],
    grid [values] (every value is tried)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Param":
        given = [k for k in ("loguniform", "uniform", "randint", "choice", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of loguniform, uniform, randint, choice, grid (got {given or 'none'})")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: low must be > 0")
        if (self.choice is not None and not self.choice) or (self.grid is not None and not self.grid):
            raise ValueError(f"{given[0]}: needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("loguniform", "uniform", "randint", "choice", "grid") if getattr(self, k) is not None)

    def examples(self) -> list[Any]:
        """Values that must all validate in the stage's config (bounds, every choice)."""
        if self.kind in ("choice", "grid"):
            return list(getattr(self, self.kind))
        low, high = getattr(self, self.kind)
        return [low, high - 1] if self.kind == "randint" else [low, high]

    def to_tune(self):
        from ray import tune

        kind = self.kind
        if kind == "loguniform":
            return tune.loguniform(*self.loguniform)
        if kind == "uniform":
            return tune.uniform(*self.uniform)
        if kind == "randint":
            return tune.randint(*self.randint)
        if kind == "choice":
            return tune.choice(self.choice)
        return tune.grid_search(self.grid)


class Scheduler(StrictModel):
    type: Literal["asha", "pbt", "fifo"] = "asha"
    grace_period: int = Field(default=1, ge=1, description="evaluations before ASHA may stop a trial")
    reduction_factor: float = Field(default=2.0, gt=1)
    perturbation_interval: int = Field(default=1, ge=1, description="PBT: evaluations between exploit/explore")


class TuneConfig(StrictModel):
    stage: Literal["pretrain", "sft", "reward", "dpo", "grpo"] = "pretrain"
    space: dict[str, Param] = Field(description="dotted field path in the stage's config -> distribution")
    metric: str = Field(default="val_loss", description="pretrain: val_loss; TRL stages: eval_loss, eval_accuracy "
                        "(reward), reward (grpo), ... with their eval_every set")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(default=6, ge=1, description="trials (with grid: repeats of the grid)")
    time_budget_s: float | None = Field(default=None, gt=0, description="stop starting trials after this long")
    scheduler: Scheduler = Scheduler()
    searcher: Literal["optuna", "random", "grid"] = "optuna"
    trial: dict[str, Any] = Field(default_factory=dict, description="stage fields set in every trial (short runs)")
    max_concurrent: int = Field(default=2, ge=1)
    cpus_per_trial: float = Field(default=1.0, gt=0)
    max_failures: int = Field(default=0, ge=0, description="restarts of a crashed trial before it counts as failed")
    seed: int = 0

    @model_validator(mode="after")
    def _compatible(self) -> "TuneConfig":
        if not self.space:
            raise ValueError("space is empty: name at least one field to search")
        grids = [k for k, p in self.space.items() if p.kind == "grid"]
        if self.searcher == "grid" and len(grids) != len(self.space):
            raise ValueError(f"searcher grid needs every space entry as grid (not: {sorted(set(self.space) - set(grids))})")
        if self.searcher == "optuna" and grids:
            raise ValueError(f"searcher optuna cannot take grid entries ({grids}); use choice or searcher: grid")
        if self.scheduler.type == "pbt" and self.searcher == "optuna":
            raise ValueError("scheduler pbt mutates trials itself: use searcher random (or grid) with it")
        return self


def check_space(cfg: TuneConfig, stage_model: type[StrictModel], base: dict[str, Any]) -> dict[str, Any]:
    """The tuned stage's section with the trial overrides, after checking that every value the
    space can take validates in the stage's config model; errors name the field."""
    from pydantic import ValidationError

    # A trial runs in one process: check the section the way a trial will see it.
    section = deep_merge(deep_merge(base, {"scaling": {"num_workers": 1}}), nested(cfg.trial))
    if section.get("warmup_steps", 0) >= section.get("steps", 1):  # a short trial warms up for a tenth of it
        section["warmup_steps"] = section["steps"] // 10
    try:
        stage_model.model_validate(section)
    except ValidationError as e:
        raise ConfigError(f"tune.trial: the trial settings do not fit stage {cfg.stage!r}: {e.errors()[0]['msg']} "
                          f"at {'.'.join(str(p) for p in e.errors()[0]['loc'])}") from None
    for path, param in cfg.space.items():
        for value in param.examples():
            try:
                stage_model.model_validate(deep_merge(section, nested({path: value})))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ConfigError(f"tune.space.{path}: value {value!r} does not fit {cfg.stage}.{where}: {err['msg']}") from None
    return section
