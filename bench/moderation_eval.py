"""Moderation quality and latency on the held-out labeled split: ours vs a lexicon-only peer.

Ours is the `moderation` stage's code path (rules + fine-tuned MiniLM + lexicon -> softmax
head, trained on the split's train part); the peer is `better-profanity`'s own
`contains_profanity`, the usual drop-in filter. Both see the same held-out examples, one
request at a time. With --serve the per-request latency is also measured through the Ray Serve
moderation deployment's handle (a local Ray is started).

    .venv/bin/python bench/moderation_eval.py [--serve]

The last line is JSON with the figures: recall on harmful, false-positive rate on benign,
p95 latency, and `ratio` = our recall / the peer's recall.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def peer(heldout) -> dict:
    from better_profanity import profanity

    profanity.load_censor_words()
    flags, ms = [], []
    for e in heldout:
        t = time.perf_counter()
        flags.append(profanity.contains_profanity(e.text))
        ms.append((time.perf_counter() - t) * 1000)
    harmful = np.array([bool(e.labels) for e in heldout])
    flags = np.array(flags)
    return {"recall_harmful": round(float(flags[harmful].mean()), 3), "fpr_benign": round(float(flags[~harmful].mean()), 3),
            "latency_ms": {"p95": round(float(np.percentile(ms, 95)), 2)}}


def through_serve(classifier_dir: Path, heldout) -> dict:
    """Per-request latency through the deployment handle (Ray Serve, local Ray)."""
    import ray
    from ray import serve

    from serve.moderation.deployment import ModerationServer
    from serve.moderation.moderation_config import ModerationConfig

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = serve.deployment(ModerationServer, name="moderation").bind(
            ModerationConfig().model_dump(mode="json"), str(classifier_dir), None, None)
        handle = serve.run(app, name="moderation-bench", route_prefix=None)
        handle.screen.remote(["warm up"], "input").result()
        ms = []
        for e in heldout:
            t = time.perf_counter()
            handle.screen.remote([e.text], "input").result()
            ms.append((time.perf_counter() - t) * 1000)
        return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help="also time requests through the Ray Serve deployment")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moderation_eval.json")
    args = ap.parse_args()

    from serve.moderation.classifier import load_labeled, split
    from serve.moderation.stage import ModerationStageConfig, table, train_and_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        ours = train_and_evaluate(ModerationStageConfig(), Path(tmp))
        heldout = split(load_labeled())[1]
        served = through_serve(Path(tmp) / "classifier", heldout) if args.serve else None
    theirs = peer(heldout)
    print(table(ours))
    print(f"peer (better-profanity contains_profanity): recall {theirs['recall_harmful']}, FPR {theirs['fpr_benign']}, "
          f"p95 {theirs['latency_ms']['p95']} ms")
    if served:
        print(f"through the Ray Serve deployment handle: p50 {served['p50']} ms, p95 {served['p95']} ms")
    print("missed:", *ours["missed"], sep="\n  ")
    print("false positives:", *ours["false_positives"], sep="\n  ")
    line = {"heldout": ours["heldout"], "recall_harmful": ours["recall_harmful"], "fpr_benign": ours["fpr_benign"],
            "p95_ms": ours["latency_ms"]["p95"], "p95_ms_serve": served and served["p95"],
            "peer_recall": theirs["recall_harmful"], "peer_fpr": theirs["fpr_benign"],
            "ratio": round(ours["recall_harmful"] / max(theirs["recall_harmful"], 1e-9), 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ours": ours, "peer": theirs, "serve": served, "summary": line}, indent=2,
                                   ensure_ascii=False) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
