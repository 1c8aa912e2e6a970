"""Stage `tune` on a real local Ray: Ray Tune trials that run the pretrain loop, ASHA + Optuna."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cluster.config import build_recipe, load_recipe
from cluster.errors import ConfigError
from cluster.runner import run_stage
from tests.conftest import DOCS_CORPUS, REPO, copy_corpus

BASE = {
    **DOCS_CORPUS,
    "pretrain": {"global_batch": 4, "micro_batch": 4, "warmup_steps": 1, "lr": 3e-3, "zero_stage": 0,
                 "scaling": {"num_workers": 1}},
}
TUNE = {"stage": "pretrain", "space": {"lr": {"loguniform": [1e-4, 3e-2]}, "warmup_steps": {"choice": [1, 2, 4]}},
        "trial": {"steps": 12, "eval_every": 3, "eval_batches": 2}, "num_samples": 6, "max_concurrent": 2}


@pytest.fixture(scope="module")
def tune_runs(docs_corpus, tmp_path_factory):
    runs = tmp_path_factory.mktemp("tune_runs")
    copy_corpus(docs_corpus, runs)
    return runs


def _recipe_file(runs: Path, run: str, **tune) -> Path:
    copy_corpus(runs / "base", runs, run)
    path = runs / f"{run}.yaml"
    path.write_text(yaml.safe_dump({"run": run, "runs_dir": str(runs), "stages": ["tune"], **BASE,
                                    "tune": {**TUNE, **tune}}))
    return path


@pytest.mark.slow
def test_a_tiny_search_stops_bad_trials_early_and_writes_a_best_overlay(tune_runs):
    path = _recipe_file(tune_runs, "search")
    manifest = run_stage(load_recipe(path), "tune")
    folder = tune_runs / "search/tune"
    trials = pd.read_csv(folder / "trials.csv")
    assert len(trials) == 6 and set(trials["status"]) == {"finished"}
    assert (trials["steps"] < 12).sum() >= 1, "ASHA stopped no trial early"
    assert (trials["steps"] == 12).sum() >= 1
    assert manifest.metrics["stopped_early"] >= 1 and manifest.metrics["trial_steps"] == trials["steps"].sum()
    assert (folder / "trials.png").stat().st_size > 1000
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert set(best["pretrain"]) == {"lr", "warmup_steps"}
    assert best["pretrain"]["lr"] == pytest.approx(trials["lr"][trials["val_loss"].idxmin()])
    tuned = load_recipe(REPO / "configs/tiny-cpu.yaml", overlays=[folder / "best.yaml"])
    assert tuned.stage_config("pretrain").lr == pytest.approx(best["pretrain"]["lr"])


@pytest.mark.slow
def test_a_crashing_trial_is_recorded_as_failed_and_the_search_goes_on(tune_runs):
    path = _recipe_file(tune_runs, "grid", searcher="grid", num_samples=1, scheduler={"type": "fifo"},
                        space={"lr": {"grid": [3e-3, 1e30]}})
    run_stage(load_recipe(path), "tune")
    trials = pd.read_csv(tune_runs / "grid/tune/trials.csv")
    assert len(trials) == 2
    failed = trials[trials["status"] == "failed"]
    assert len(failed) == 1 and failed["lr"].iloc[0] == 1e30 and "not finite" in failed["error"].iloc[0]
    best = yaml.safe_load((tune_runs / "grid/tune/best.yaml").read_text())
    assert best == {"pretrain": {"lr": 3e-3}}


def test_a_bad_field_in_the_space_is_rejected_before_any_trial(tune_runs):
    with pytest.raises(ConfigError, match=r"tune.space.lrr: value 0.0001 does not fit pretrain.lrr: Extra inputs"):
        run_stage(load_recipe(_recipe_file(tune_runs, "badfield", space={"lrr": {"loguniform": [1e-4, 1e-2]}})), "tune")
    with pytest.raises(ConfigError, match=r"tune.space.warmup_steps: value -1 does not fit pretrain.warmup_steps"):
        run_stage(load_recipe(_recipe_file(tune_runs, "badvalue", space={"warmup_steps": {"choice": [1, -1]}})), "tune")
    with pytest.raises(ConfigError, match="searcher optuna cannot take grid entries"):
        build_recipe({"run": "x", "tune": {"space": {"lr": {"grid": [1e-3]}}}})
    with pytest.raises(ConfigError, match="give exactly one of"):
        build_recipe({"run": "x", "tune": {"space": {"lr": {"uniform": [0, 1], "choice": [1]}}}})


@pytest.mark.slow
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(tune_runs):
    path = _recipe_file(tune_runs, "interrupted", num_samples=3, max_concurrent=1, scheduler={"type": "fifo"},
                        trial={"steps": 24, "eval_every": 3, "eval_batches": 2})
    aero = [str(Path(sys.executable).parent / "aero"), "tune", str(path)]
    proc = subprocess.Popen(aero, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=os.environ.copy())
    storage = tune_runs / "interrupted/tune/ray_results/tune"
    deadline = time.monotonic() + 300

    def finished() -> list[Path]:  # trials whose last report is the last step
        return [p.parent for p in storage.glob("*/result.json")
                if any(json.loads(line).get("step") == 24 for line in p.read_text().splitlines() if line.strip())]

    while time.monotonic() < deadline and not finished():
        time.sleep(0.5)
    done_before = {p.name: (p / "result.json").read_text() for p in finished()}
    assert done_before, "no trial finished before the deadline"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "the search was interrupted" in out, out[-3000:]

    again = subprocess.run(aero, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "restoring the interrupted search" in again.stdout + again.stderr
    trials = pd.read_csv(tune_runs / "interrupted/tune/trials.csv")
    assert len(trials) == 3 and set(trials["status"]) == {"finished"} and set(trials["steps"]) == {24}
    for name, before in done_before.items():
        assert (storage / name / "result.json").read_text() == before, f"finished trial {name} was run again"

