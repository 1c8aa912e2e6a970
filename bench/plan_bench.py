"""The pre-flight planner's memory estimate against the measured peak, per worker.

Runs the real `pretrain` stage (Ray Train, 2 CPU workers, DeepSpeed) at two model sizes and
two ZeRO stages on the pydoc corpus, and compares each run's `peak_rss_mb` (the largest
peak RSS over its workers, from the stage's `train.json`) with what `aero plan` estimates
for the same recipe. Target: every estimate within 25% of the measurement. The GPU side of
the same check is `bench/gpu_train.py` (allocator peak + CUDA context on one GPU).

    python bench/plan_bench.py            # ~5 min on 2 cores
Ends with one JSON line.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = {
    "h512-l4": {"preset": "tiny", "overrides": {"hidden_size": 512, "intermediate_size": 1376,
                                                "num_hidden_layers": 4, "num_attention_heads": 8,
                                                "num_key_value_heads": 8}},
    "125m": {"preset": "125m"},
}


def main() -> None:
    from cluster.config import build_recipe
    from cluster.plan import recipe_needs
    from cluster.runner import run_stage

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {"run": "plan", "runs_dir": tmp, "stages": ["data", "tokenizer"],
                "data": {"sources": ["stdlib:docs"], "val_fraction": 0.1},
                "tokenizer": {"vocab_size": 4096, "seq_len": 128}}
        corpus = build_recipe(base)
        for stage in corpus.stages:
            run_stage(corpus, stage)
        for size, model in SIZES.items():
            for zero in (2, 3):
                pretrain = {"model": model, "zero_stage": zero, "steps": 3, "warmup_steps": 1, "global_batch": 4,
                            "micro_batch": 2, "checkpoint_every": 100, "eval_every": 100, "eval_batches": 1,
                            "scaling": {"num_workers": 2}}
                recipe = build_recipe({**base, "run": f"plan-{size}-z{zero}", "stages": ["pretrain"],
                                       "pretrain": pretrain})
                for stage in ("data", "tokenizer"):  # the same corpus for every run
                    target = recipe.run_dir / stage
                    if not target.exists():
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.symlink_to(corpus.run_dir / stage)
                need = recipe_needs(recipe, ["pretrain"])[0]
                manifest = run_stage(recipe, "pretrain")
                measured = manifest.metrics["peak_rss_mb"] / 1024
                estimate = need.ram_bytes / 2**30
                row = {"model": size, "params_m": round(float(need.note.split("M")[0])), "zero_stage": zero,
                       "estimate_gib": round(estimate, 3), "measured_gib": round(measured, 3),
                       "ratio": round(estimate / measured, 3),
                       "parts_gib": {k: round(v / 2**30, 3) for k, v in need.parts.items()}}
                rows.append(row)
                print(f"{size} ZeRO-{zero}: estimate {estimate:.2f} GiB, measured peak RSS {measured:.2f} GiB "
                      f"per worker ({estimate / measured:.2f}x)", flush=True)
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(json.dumps({"bench": "plan", "rows": rows, "worst_error": round(worst, 3), "target_error": 0.25}))


if __name__ == "__main__":
    main()
