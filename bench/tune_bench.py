"""Search benchmark: stage `tune` with ASHA + Optuna TPE against plain random search (no early
stopping), same trial budget, same seed, same space, on the tiny pretrain stage.

    .venv/bin/python bench/tune_bench.py [--trials 8] [--steps 40]

Prints both best validation losses and the compute each used (trial-steps: optimizer steps
summed over trials). Target: ours reaches an equal or lower best loss with less compute.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SPACE = {"lr": {"loguniform": [1e-4, 3e-2]}, "warmup_steps": {"choice": [2, 5, 10]},
         "weight_decay": {"uniform": [0.0, 0.2]}}


def search(runs: Path, run: str, *, trials: int, steps: int, ours: bool) -> dict:
    from cluster.config import build_recipe
    from cluster.runner import run_stage

    for stage in ("data", "tokenizer"):
        if not (runs / run / stage).exists() and (runs / "base" / stage).exists():
            shutil.copytree(runs / "base" / stage, runs / run / stage)
    shutil.rmtree(runs / run / "tune", ignore_errors=True)
    recipe = build_recipe({
        "run": run, "runs_dir": str(runs), "ray": {"num_cpus": 2, "dashboard": False},
        "stages": ["data", "tokenizer", "tune"],
        "data": {"sources": ["stdlib:docs", "stdlib:code/json/*.py"], "val_fraction": 0.2},
        "tokenizer": {"vocab_size": 2048, "seq_len": 128},
        "pretrain": {"global_batch": 8, "micro_batch": 8, "zero_stage": 0, "scaling": {"num_workers": 1}},
        "tune": {"stage": "pretrain", "space": SPACE, "num_samples": trials, "max_concurrent": 2, "seed": 0,
                 "trial": {"steps": steps, "eval_every": max(1, steps // 8), "eval_batches": 4},
                 "searcher": "optuna" if ours else "random",
                 "scheduler": {"type": "asha", "grace_period": 2, "reduction_factor": 2} if ours else {"type": "fifo"}},
    })
    for stage in recipe.stages:
        run_stage(recipe, stage)
    return json.loads((runs / run / "tune" / "tune.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "tune")
    args = parser.parse_args()
    ours = search(args.out, "base", trials=args.trials, steps=args.steps, ours=True)
    print(f"ours (ASHA + Optuna TPE): best val_loss {ours['best_val_loss']:.4f}, {ours['trial_steps']} trial-steps, "
          f"{ours['stopped_early']} of {ours['trials']} trials stopped early", flush=True)
    peer = search(args.out, "random", trials=args.trials, steps=args.steps, ours=False)
    print(f"peer (random search, no early stopping): best val_loss {peer['best_val_loss']:.4f}, "
          f"{peer['trial_steps']} trial-steps", flush=True)
    print(json.dumps({"bench": "tune", "ours_best": round(ours["best_val_loss"], 4),
                      "random_best": round(peer["best_val_loss"], 4), "ours_steps": ours["trial_steps"],
                      "random_steps": peer["trial_steps"],
                      "ratio": round(peer["trial_steps"] / max(1, ours["trial_steps"]), 3)}))


if __name__ == "__main__":
    main()
