"""Moderation quality and latency on the held-out labeled split: ours vs a lexicon-only peer.

Ours is the `moderation` stage's code path (rules + fine-tuned MiniLM + lexicon -> softmax
head, mixed with character and word n-grams; trained on the split's train part); the peer is
`better-profanity`'s own `contains_profanity`, the usual drop-in filter. Both see the same
held-out examples, one request at a time. With --serve the per-request latency is also
measured through the Ray Serve moderation deployment's handle (a local Ray is started). With --cv K the training part is also
scored out of fold (K classifiers, each trained without one fold; ~K minutes more): how well the
fine-tuned model alone and mixed with the n-gram scorer (several weights) separate harmful from
benign, as the recall at FPR <= 0.05 with one threshold picked on those pooled scores. It runs
below the held-out figures (each fold's model trains on a fifth less data, and five models'
scores share one threshold) but compares the variants on 3x the examples: it is what the
classifier's n-gram weights (plain, accented text) are picked by. With --draws N the whole
evaluation is repeated on N other held-out draws (other hash salts, same sizes): how much the
figures depend on which examples the split happened to hold out.

    .venv/bin/python bench/moderation_eval.py [--serve] [--cv 5] [--draws 3]

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


WEIGHT_GRID = tuple((plain, acc) for plain in (0.25, 0.5) for acc in (0.5, 0.75, 0.9))


def out_of_fold(train_part, k: int) -> dict:
    """Out-of-fold P(not benign) on the training part for the fine-tuned model alone and mixed
    with the n-grams at each (plain, accented) weight pair in WEIGHT_GRID: AUC and the recall
    (rules included) at FPR <= 0.05, overall and per language. What NGRAM_WEIGHTS is picked by."""
    from sklearn.metrics import roc_auc_score

    from serve.moderation.classifier import NGRAM_WEIGHTS, primary, stratified_split
    from serve.moderation.rules import screen_rules
    from serve.moderation.stage import ModerationStageConfig, fit_classifier

    variants = {"fine-tuned alone": (0.0, 0.0),
                **{f"n-grams {p}/{a}" + (" (default)" if (p, a) == NGRAM_WEIGHTS else ""): (p, a) for p, a in WEIGHT_GRID}}
    texts = [e.text for e in train_part]
    scores = {name: np.zeros(len(texts)) for name in variants}
    for f in range(k):  # stratified folds: every class spread over them by text hash
        rest, held = stratified_split(train_part, k, primary, salt="cv:", part=f)
        model = fit_classifier(ModerationStageConfig(), rest)
        held = {e.text for e in held}
        idx = [i for i, t in enumerate(texts) if t in held]
        for name, weights in variants.items():
            scores[name][idx] = model.predict([texts[i] for i in idx], ngram_weights=weights)[1]
    harmful = np.array([bool(e.labels) for e in train_part])
    learned = np.array([primary(e) != "benign" for e in train_part])
    lang = np.array([e.lang for e in train_part])
    rule = np.array([bool(screen_rules(t).scores) for t in texts])
    out = {"examples": len(texts), "folds": k}
    for name, s in scores.items():
        flag = rule
        for t in np.unique(s):  # the lowest threshold with FPR <= 0.05
            flag = (s >= t) | rule
            if flag[~harmful].mean() <= 0.05:
                break
        mask = learned | ~harmful
        out[name] = {"auc": round(float(roc_auc_score(learned[mask], s[mask])), 4),
                     "recall_at_fpr_0.05": round(float(flag[harmful].mean()), 3), "fpr": round(float(flag[~harmful].mean()), 3),
                     **{f"recall_{L}": round(float(flag[harmful & (lang == L)].mean()), 3) for L in sorted(set(lang))},
                     **{f"auc_{L}": round(float(roc_auc_score(learned[mask & (lang == L)], s[mask & (lang == L)])), 4)
                        for L in sorted(set(lang))}}
    return out


def other_draws(n: int) -> list[dict]:
    """The whole evaluation again on `n` other held-out draws (other hash salts, same sizes)."""
    from serve.moderation.stage import ModerationStageConfig, train_and_evaluate

    out = []
    for i in range(1, n + 1):
        with tempfile.TemporaryDirectory() as tmp:
            ev = train_and_evaluate(ModerationStageConfig(heldout_salt=f"draw{i}:"), Path(tmp))
        out.append({"salt": f"draw{i}:", "recall_harmful": ev["recall_harmful"], "fpr_benign": ev["fpr_benign"],
                    **{f"recall_{L}": m["recall"] for L, m in ev["per_language"].items()}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", action="store_true", help="also time requests through the Ray Serve deployment")
    ap.add_argument("--cv", type=int, default=0, metavar="K", help="also score the training part out of fold (K >= 2)")
    ap.add_argument("--draws", type=int, default=0, metavar="N", help="also evaluate on N other held-out draws")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moderation_eval.json")
    args = ap.parse_args()

    from serve.moderation.classifier import load_labeled, split
    from serve.moderation.stage import ModerationStageConfig, table, train_and_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        ours = train_and_evaluate(ModerationStageConfig(), Path(tmp))
        heldout = split(load_labeled())[1]
        served = through_serve(Path(tmp) / "classifier", heldout) if args.serve else None
    cv = out_of_fold(split(load_labeled())[0], args.cv) if args.cv >= 2 else None
    draws = other_draws(args.draws)
    theirs = peer(heldout)
    print(table(ours))
    print(f"peer (better-profanity contains_profanity): recall {theirs['recall_harmful']}, FPR {theirs['fpr_benign']}, "
          f"p95 {theirs['latency_ms']['p95']} ms")
    if served:
        print(f"through the Ray Serve deployment handle: p50 {served['p50']} ms, p95 {served['p95']} ms")
    if cv:
        print(f"out of fold ({cv['folds']} folds over the {cv['examples']} training examples):",
              *(f"{name}: {m}" for name, m in cv.items() if isinstance(m, dict)), sep="\n  ")
    if draws:
        print(f"{len(draws)} other held-out draws (recall on harmful / FPR on benign):",
              *(f"{d['salt']} {d['recall_harmful']} / {d['fpr_benign']}" for d in draws), sep="\n  ")
    print("missed:", *ours["missed"], sep="\n  ")
    print("false positives:", *ours["false_positives"], sep="\n  ")
    line = {"heldout": ours["heldout"], "recall_harmful": ours["recall_harmful"], "fpr_benign": ours["fpr_benign"],
            "p95_ms": ours["latency_ms"]["p95"], "p95_ms_serve": served and served["p95"],
            "cv_recall_at_fpr_0.05": cv and {n: m["recall_at_fpr_0.05"] for n, m in cv.items() if isinstance(m, dict)},
            "other_draws": draws and [[d["recall_harmful"], d["fpr_benign"]] for d in draws],
            "peer_recall": theirs["recall_harmful"], "peer_fpr": theirs["fpr_benign"],
            "ratio": round(ours["recall_harmful"] / max(theirs["recall_harmful"], 1e-9), 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ours": ours, "peer": theirs, "serve": served, "cv": cv, "draws": draws, "summary": line}, indent=2,
                                   ensure_ascii=False) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
