"""Moderation quality and latency, in one run: recall on harmful text, false-positive rates on
benign look-alikes, on real text nobody here wrote and on persona / system prompts, and p95
latency in-process and through the HTTP endpoint; ours vs a lexicon-only peer.

Ours is the `moderation` stage's code path (rules + fine-tuned MiniLM + lexicon -> softmax
head, mixed with character and word n-grams; trained on the labeled split's train part plus
the train parts of the real-text set and the personas). Every figure is on examples it never
trained or calibrated on: the labeled held-out split (harmful, and benign look-alikes), the
held-out part of every source of `real_text.jsonl` and of `personas.jsonl` (screened with each
prompt's own role, under the shipped per-role policy, and all as user messages). The peer is
`better-profanity`'s own `contains_profanity`, the usual drop-in filter. Latency: one request
at a time, in-process and through the gateway's POST /v1/moderations on a local Ray Serve.
With --cv K the training part is also scored out of fold (K classifiers, each trained
without one fold; ~K minutes more): how well the fine-tuned model alone and mixed with the
n-gram scorer (several weights) separate harmful from benign labeled text, as the recall at
FPR <= 0.05 with one threshold picked on those pooled scores; it is what the classifier's
n-gram weights (plain, accented text) are picked by. With --draws N the evaluation is
repeated on N other held-out draws of the labeled set (other hash salts, same sizes).

    .venv/bin/python bench/moderation_bench.py [--cv 5] [--draws 3] [--no-http]

The last line is JSON with the figures, the goals and whether each is met.
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


def through_http(classifier_dir: Path, texts: list[str]) -> dict:
    """Per-request latency of POST /v1/moderations through the gateway on a local Ray Serve
    (moderation only: the one model is an upstream that is never called)."""
    import httpx
    import ray
    from ray import serve

    from serve.app import CLASSIFIER, deploy
    from serve.serve_config import ServeConfig

    cfg = ServeConfig.model_validate({
        "models": [{"name": "none", "upstream": "http://127.0.0.1:9/v1"}], "port": free_port(),
        "qa": {"index": None}, "feedback": {"enabled": False}, "auth": {"enabled": False}})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base = deploy(cfg, {CLASSIFIER: str(classifier_dir)})
        with httpx.Client(base_url=base, timeout=60) as client:
            for _ in range(60):  # the deployments come up
                try:
                    if client.post("/v1/moderations", json={"input": "warm up"}).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            ms = []
            for t in texts:
                started = time.perf_counter()
                r = client.post("/v1/moderations", json={"input": t})
                ms.append((time.perf_counter() - started) * 1000)
                r.raise_for_status()
        return {"requests": len(ms), "p50": round(float(np.percentile(ms, 50)), 2),
                "p95": round(float(np.percentile(ms, 95)), 2)}
    finally:
        serve.shutdown()
        ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GOALS = {"recall_harmful": (">=", 0.95), "fpr_lookalikes": ("<=", 0.03), "fpr_real_text": ("<=", 0.01),
         "fpr_personas": ("<=", 0.03), "p95_ms": ("<=", 20.0), "p95_ms_http": ("<=", 50.0)}


def goals(figures: dict) -> dict:
    """{figure: [value, goal, met]} for the issue's goals."""
    out = {}
    for k, (op, bar) in GOALS.items():
        v = figures.get(k)
        out[k] = [v, f"{op} {bar}", None if v is None else bool(v >= bar if op == ">=" else v <= bar)]
    return out


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
    ap.add_argument("--no-http", action="store_true", help="skip the latency through the HTTP endpoint")
    ap.add_argument("--cv", type=int, default=0, metavar="K", help="also score the training part out of fold (K >= 2)")
    ap.add_argument("--draws", type=int, default=0, metavar="N", help="also evaluate on N other held-out draws")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "moderation_bench.json")
    args = ap.parse_args()

    from serve.moderation.classifier import load_labeled, split
    from serve.moderation.stage import ModerationStageConfig, table, train_and_evaluate

    with tempfile.TemporaryDirectory() as tmp:
        ours = train_and_evaluate(ModerationStageConfig(), Path(tmp))
        heldout = split(load_labeled())[1]
        http = None if args.no_http else through_http(Path(tmp) / "classifier", [e.text for e in heldout])
    cv = out_of_fold(split(load_labeled())[0], args.cv) if args.cv >= 2 else None
    draws = other_draws(args.draws)
    theirs = peer(heldout)
    print(table(ours))
    print(f"peer (better-profanity contains_profanity): recall {theirs['recall_harmful']}, FPR {theirs['fpr_benign']}, "
          f"p95 {theirs['latency_ms']['p95']} ms")
    if http:
        print(f"through POST /v1/moderations (gateway + moderation deployment, HTTP): p50 {http['p50']} ms, "
              f"p95 {http['p95']} ms over {http['requests']} requests")
    if cv:
        print(f"out of fold ({cv['folds']} folds over the {cv['examples']} training examples):",
              *(f"{name}: {m}" for name, m in cv.items() if isinstance(m, dict)), sep="\n  ")
    if draws:
        print(f"{len(draws)} other held-out draws (recall on harmful / FPR on benign):",
              *(f"{d['salt']} {d['recall_harmful']} / {d['fpr_benign']}" for d in draws), sep="\n  ")
    print("missed:", *ours["missed"], sep="\n  ")
    print("false positives (look-alikes):", *ours["false_positives"], sep="\n  ")
    for key in ("real", "personas"):
        print(f"false positives ({key}):", *(f"[{fp['role']}] {fp['text'][:150]}  {fp['reasons']}"
                                              for fp in ours[key]["false_positives"]), sep="\n  ")
    figures = {"recall_harmful": ours["recall_harmful"], "fpr_lookalikes": ours["fpr_benign"],
               "fpr_real_text": ours["real"]["fpr"], "fpr_personas": ours["personas"]["fpr"],
               "p95_ms": ours["latency_ms"]["p95"], "p95_ms_http": http and http["p95"]}
    line = {"heldout": ours["heldout"], "real_text_heldout": ours["real"]["n"], "personas_heldout": ours["personas"]["n"],
            **figures, "fpr_personas_as_user": ours["personas_as_user"]["fpr"],
            "fpr_real_per_source": {s: m["fpr"] for s, m in ours["real"]["per_source"].items()},
            "cv_recall_at_fpr_0.05": cv and {n: m["recall_at_fpr_0.05"] for n, m in cv.items() if isinstance(m, dict)},
            "other_draws": draws and [[d["recall_harmful"], d["fpr_benign"]] for d in draws],
            "peer_recall": theirs["recall_harmful"], "peer_fpr": theirs["fpr_benign"],
            "ratio": round(ours["recall_harmful"] / max(theirs["recall_harmful"], 1e-9), 2), "goals": goals(figures)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ours": ours, "peer": theirs, "http": http, "cv": cv, "draws": draws, "summary": line},
                                   indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(line))


if __name__ == "__main__":
    main()
