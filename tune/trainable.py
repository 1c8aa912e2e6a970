"""A Tune trial = a training stage's own code in one process, with the sampled fields set in
the stage's config.

`pretrain`: the per-worker loop (`jobs.train_loop.run_training`); every evaluation is
reported to Tune with a checkpoint (ASHA stops on it, PBT exploits it, a restored search
resumes from it), so the trial config sets checkpoint_every = log_every = eval_every.
`sft`, `reward`, `dpo`, `grpo`: the stage's TRL trainer (`jobs.trl_worker.build_trainer`);
every log that carries the metric (eval logs at `eval_every`, GRPO's training reward) is
reported; an unfinished TRL trial of a restored search starts again from step 0."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.config import deep_merge, nested
from jobs.train_loop import LocalEnv, checkpoint_dir


class TuneEnv(LocalEnv):
    """LocalEnv whose reports and checkpoints go to Ray Tune."""

    def latest_checkpoint(self):
        from ray import tune

        return checkpoint_dir(tune.get_checkpoint())

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        from ray import tune

        if metrics.get("val_loss") is None:
            return
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report({k: v for k, v in metrics.items() if v is not None}, checkpoint=checkpoint)


def trial_section(section: dict[str, Any], sampled: dict[str, Any]) -> dict[str, Any]:
    """The stage section of one trial: sampled fields set, one in-process worker, and every
    evaluation reported with a checkpoint."""
    merged = deep_merge(section, nested(sampled))
    every = merged.get("eval_every", 20)
    return deep_merge(merged, {"checkpoint_every": every, "log_every": every,
                               "scaling": {"num_workers": 1, "threads_per_worker": 1}})


def pretrain_trial(sampled: dict[str, Any], *, section: dict[str, Any], index: dict[str, Any]) -> None:
    """The function Tune runs per trial."""
    import ray.tune

    from jobs.pretrain import plan_run
    from jobs.pretrain_config import PretrainConfig
    from jobs.train_loop import run_training

    cfg = PretrainConfig.model_validate(trial_section(section, sampled))
    out = Path(ray.tune.get_context().get_trial_dir()) / "work"
    run_training(cfg, plan_run(cfg, index), TuneEnv(index, cfg.micro_batch, out))


def trl_trial(sampled: dict[str, Any], *, kind: str, section: dict[str, Any], paths: dict[str, str], metric: str) -> None:
    """The function Tune runs per trial of a TRL stage."""
    import ray.tune
    from transformers import TrainerCallback

    from jobs.trl_worker import CONFIGS, build_trainer

    cfg = CONFIGS[kind].model_validate(deep_merge(deep_merge(section, nested(sampled)), {"scaling": {"num_workers": 1}}))

    class ReportToTune(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and metric in logs:
                numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                ray.tune.report({**numbers, "step": state.global_step})

    work = Path(ray.tune.get_context().get_trial_dir()) / "trainer"
    build_trainer(kind, cfg, paths, str(work), [ReportToTune()]).train()
