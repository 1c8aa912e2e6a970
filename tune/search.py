"""Stage `tune` (also `aero tune CONFIG`): a Ray Tune search over a training stage's config.

ASHA stops bad trials early (PBT or FIFO as options); Optuna's TPE proposes trials (random or
grid as options); the budget is a number of trials and/or wall time. A rerun of an
interrupted search restores it with `Tuner.restore` (finished trials are kept, unfinished
ones resume from their last checkpoint); a crashing trial is recorded as failed with its
error and the search goes on. Writes `trials.csv`, `trials.png`, `tune.json` and `best.yaml`,
an overlay for `aero pipeline CONFIG --overlay best.yaml`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml

from cluster.artifact_store import join_uri
from cluster.config import nested
from cluster.errors import UserError
from cluster.manifest import atomic_write_text
from cluster.records import plot_curves
from cluster.stage import Stage, StageContext, StageResult
from tune.search_config import TuneConfig, check_space


def _scheduler(cfg: TuneConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = cfg.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="training_iteration", grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        mutations = {path: p.to_tune() for path, p in cfg.space.items() if p.kind != "grid"}
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations, seed=cfg.seed)
    return FIFOScheduler()


def _searcher(cfg: TuneConfig):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.searcher == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(2, cfg.num_samples // 3))
        return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=cfg.max_concurrent)
    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent)


def _ended_trials(record: Path):
    """A Tune callback that appends to `record` the id of every trial that ended by itself
    (finished, stopped by the scheduler, or errored). A Ctrl-C stops the running trials
    without such an end, so they are told apart from early-stopped ones, across restores."""
    from ray.tune import Callback

    class EndedTrials(Callback):
        def _note(self, trial) -> None:
            with open(record, "a", encoding="utf-8") as f:
                f.write(trial.trial_id + "\n")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._note(trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._note(trial)

    return EndedTrials()


def expected_trials(cfg: TuneConfig) -> int:
    grid = math.prod(len(p.grid) for p in cfg.space.values() if p.kind == "grid")
    return cfg.num_samples * grid


def build_tuner(cfg: TuneConfig, section: dict[str, Any], inputs: dict[str, Any], storage: str, ended):
    from ray import tune

    from tune.trainable import pretrain_trial, trl_trial

    if cfg.stage == "pretrain":
        trial = tune.with_parameters(pretrain_trial, section=section, index=inputs)
    else:
        trial = tune.with_parameters(trl_trial, kind=cfg.stage, section=section, paths=inputs, metric=cfg.metric)
    trainable = tune.with_resources(trial, {"cpu": cfg.cpus_per_trial})
    if tune.Tuner.can_restore(join_uri(storage, "tune")):
        # The saved run config (with the callback) comes back with the experiment state.
        return tune.Tuner.restore(join_uri(storage, "tune"), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False), True
    return tune.Tuner(
        trainable,
        param_space={path: p.to_tune() for path, p in cfg.space.items()},
        tune_config=tune.TuneConfig(
            metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, time_budget_s=cfg.time_budget_s,
            scheduler=_scheduler(cfg), search_alg=_searcher(cfg), max_concurrent_trials=cfg.max_concurrent,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=storage, callbacks=[ended],
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures)),
    ), False


def summarize(cfg: TuneConfig, results) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One row per trial (config, best metric, steps trained, status, error) and the best row."""
    rows = []
    better = min if cfg.mode == "min" else max
    for r in results:
        history = r.metrics_dataframe
        values = [] if history is None or cfg.metric not in history else [v for v in history[cfg.metric] if v == v]
        row = {"trial": Path(r.path).name, **{k: r.config.get(k) for k in cfg.space},
               cfg.metric: better(values) if values else None,
               "evaluations": len(values), "steps": int(r.metrics.get("step") or 0) if r.metrics else 0,
               "status": "failed" if r.error else "finished", "error": str(r.error).strip().splitlines()[-1] if r.error else ""}
        rows.append(row)
    good = [row for row in rows if row[cfg.metric] is not None and math.isfinite(row[cfg.metric])]
    best = (min if cfg.mode == "min" else max)(good, key=lambda row: row[cfg.metric]) if good else None
    return rows, best


def _plot(cfg: TuneConfig, results, path: Path) -> None:
    series = {}
    for r in results:
        df = r.metrics_dataframe
        if df is not None and cfg.metric in df and "step" in df:
            series[Path(r.path).name[-18:]] = list(zip(df["step"], df[cfg.metric]))
    plot_curves(series, path, ylabel=cfg.metric, title=f"tune: {cfg.metric} per trial")


def _tuned_section(ctx: StageContext, cfg: TuneConfig) -> dict[str, Any]:
    """The recipe's section of the tuned stage: the base every trial starts from."""
    return ctx.stage_config(cfg.stage).model_dump(mode="json")


def _tuned_context(ctx: StageContext, cfg: TuneConfig) -> StageContext:
    """The tuned stage as seen from this run (its upstream stages), writing into tune's folder."""
    return StageContext(name=cfg.stage, run=ctx.run, run_dir=ctx.run_dir, stage_dir=ctx.stage_dir / "inputs",
                        stage_config=ctx.stage_config)


def _section_input(ctx: StageContext, cfg: TuneConfig) -> dict[str, str]:
    """The tuned stage's section and, for a TRL stage, its data and base models."""
    import hashlib

    section = ctx.stage_config(cfg.stage)
    inputs = {f"section:{cfg.stage}": hashlib.sha256(json.dumps(section.model_dump(mode="json"), sort_keys=True)
                                                     .encode()).hexdigest()}
    if cfg.stage != "pretrain":
        from jobs.posttrain import upstream_inputs

        inputs["stage:chat_data"] = ctx.upstream("chat_data").output_id
        inputs.update(upstream_inputs(_tuned_context(ctx, cfg), section))
    return inputs


def run(ctx: StageContext, cfg: TuneConfig) -> StageResult:
    import pandas as pd

    from cluster.stages import load_stage

    stage = load_stage(cfg.stage)
    section = check_space(cfg, stage.config_model, _tuned_section(ctx, cfg))
    if cfg.stage == "pretrain":
        inputs = json.loads(ctx.upstream_output("tokenizer", "index").read_text())
    else:  # the TRL stage's data and base model, checked the way the stage checks them
        from jobs.posttrain import prepare_paths

        inputs = prepare_paths(cfg.stage, _tuned_context(ctx, cfg), stage.config_model.model_validate(section))
    record = ctx.stage_dir / "ended_trials.txt"
    tuner, restored = build_tuner(cfg, section, inputs, ctx.checkpoint_storage, _ended_trials(record))
    if restored:
        print("aero: tune: restoring the interrupted search (finished trials are kept)", flush=True)
    start = time.monotonic()
    results = tuner.fit()
    ended = set(record.read_text().split()) if record.exists() else set()
    open_trials = [r for r in results if not r.error and (r.metrics or {}).get("trial_id") not in ended]
    out_of_time = cfg.time_budget_s is not None and time.monotonic() - start >= cfg.time_budget_s
    if open_trials or (len(results) < expected_trials(cfg) and not out_of_time):
        # Ctrl-C: Tune saved its state and stopped; a rerun restores it.
        raise UserError(f"tune: the search was interrupted ({len(results) - len(open_trials)} of "
                        f"{expected_trials(cfg)} trials ended); run the same command again to resume it")
    rows, best = summarize(cfg, results)
    pd.DataFrame(rows).to_csv(ctx.stage_dir / "trials.csv", index=False)
    _plot(cfg, results, ctx.stage_dir / "trials.png")
    if best is None:
        raise UserError(f"tune: no trial reported {cfg.metric} ({len(rows)} trials; see trials.csv for errors)")
    overlay = {cfg.stage: nested({k: best[k] for k in cfg.space})}
    atomic_write_text(ctx.stage_dir / "best.yaml", yaml.safe_dump(overlay, sort_keys=False))
    summary = {"best": best, "trials": len(rows), "failed": sum(r["status"] == "failed" for r in rows),
               "stopped_early": sum(r["status"] == "finished" and r["steps"] < section["steps"] for r in rows),
               "trial_steps": sum(r["steps"] for r in rows), f"best_{cfg.metric}": best[cfg.metric], "restored": restored}
    atomic_write_text(ctx.stage_dir / "tune.json", json.dumps(summary, indent=2, default=str) + "\n")
    return StageResult(
        outputs={"trials": ctx.stage_dir / "trials.csv", "best": ctx.stage_dir / "best.yaml",
                 "plot": ctx.stage_dir / "trials.png", "summary": ctx.stage_dir / "tune.json"},
        metrics={k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
    )


STAGE = Stage(name="tune", config_model=TuneConfig, run=run, needs=("tokenizer",), outside_inputs=_section_input,
              description="Ray Tune search (ASHA + Optuna TPE) over a training stage's config")
