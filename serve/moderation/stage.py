"""Stage `moderation`: train the moderation classifier on the labeled set and evaluate the
whole moderator (rules + classifier + policy) on the held-out split it never trained on.

Outputs `classifier/` (what the serve stage's moderation deployment loads), `eval.json` and
`eval.md`: precision, recall and false-positive rate per category, recall on harmful and
false-positive rate on benign inputs (overall and per language), and per-request latency.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from cluster.config import StrictModel
from cluster.manifest import atomic_write_text, file_hashes
from cluster.stage import Stage, StageContext, StageResult
from serve.moderation.moderation_config import CATEGORIES, ModerationConfig


class ModerationStageConfig(StrictModel):
    use_shipped: bool = Field(default=True, description="train on the labeled set shipped in serve/moderation/")
    labeled: list[str] = Field(default_factory=list, description="more labeled JSONL files ({text, labels, lang})")
    heldout_every: int = Field(default=4, ge=2, description="every k-th example per class is held out")
    heldout_salt: str = Field(default="", description="salt of the text hash that orders each class for the split: "
                                                      "another value draws another held-out part of the same size")
    epochs: int = Field(default=6, ge=1, description="fine-tuning epochs of the MiniLM encoder + head")
    lr: float = Field(default=5e-5, gt=0, description="encoder learning rate (AdamW)")
    head_lr: float = Field(default=1e-3, gt=0, description="head learning rate")
    batch_size: int = Field(default=16, ge=1)
    seed: int = 0
    calibration: float = Field(default=0.2, gt=0, lt=0.5, description="share of the training part set aside to "
                                                                       "pick the operating point")
    target_fpr: float = Field(default=0.03, gt=0, lt=1,
                              description="the operating point: false-positive rate on the calibration part's "
                                          "benign labeled examples (look-alikes of harmful text); lower costs "
                                          "recall (docs/results.md)")
    real_text: bool = Field(default=True, description="train against, calibrate on and evaluate on the shipped benign "
                                                      "real-text set (real_text.jsonl: package descriptions, man pages, "
                                                      "Python docs, Vietnamese UI strings)")
    personas: bool = Field(default=True, description="the same for the shipped persona and system prompts "
                                                     "(personas.jsonl)")
    real_heldout: float = Field(default=0.7, gt=0, lt=1, description="share of each real-text source (and of the "
                                                                     "personas) never trained or calibrated on")
    real_max: int | None = Field(default=None, ge=50, description="use at most this many real texts (by hash; "
                                                                   "for quick runs)")
    target_fpr_real: float = Field(default=0.01, gt=0, lt=1, description="the operating point's FPR bound on the "
                                                                         "calibration part's real texts")
    target_fpr_personas: float = Field(default=0.03, gt=0, lt=1, description="... and on its persona prompts")


def benign_sets(cfg: ModerationStageConfig) -> tuple[list, dict[str, list[dict]]]:
    """(benign Examples to train and calibrate on, {"real": rows, "personas": rows} held out):
    every source of the real-text set and the personas split by text hash."""
    from serve.moderation.classifier import Example
    from serve.moderation.real_text import PERSONAS, REAL_TEXT, load_real, split_heldout

    train, heldout = [], {}
    for name, path, on in (("real", REAL_TEXT, cfg.real_text), ("personas", PERSONAS, cfg.personas)):
        if not on:
            continue
        rows = load_real(path, limit=cfg.real_max if name == "real" else None)
        fit, held = split_heldout(rows, cfg.real_heldout)
        train += [Example(r["text"], (), r.get("lang", "en"), name) for r in fit]
        heldout[name] = held
    return train, heldout


def labeled_files(cfg: ModerationStageConfig) -> list[Path]:
    from serve.moderation.classifier import LABELED

    return ([LABELED] if cfg.use_shipped else []) + [Path(p).expanduser() for p in cfg.labeled]


def evaluate(moderator, heldout) -> dict:
    """Flag rates of the moderator on held-out examples, screened one request at a time."""
    flagged, latency = [], []
    moderator.screen(["warm up"], "input")
    for e in heldout:
        t = time.perf_counter()
        flagged.append(moderator.screen([e.text], "input")[0].categories)
        latency.append(time.perf_counter() - t)
    harmful = np.array([bool(e.labels) for e in heldout])
    any_flag = np.array([any(f.values()) for f in flagged])
    per_category = {}
    for c in CATEGORIES:
        truth = np.array([c in e.labels for e in heldout])
        pred = np.array([f[c] for f in flagged])
        if not truth.any():
            continue
        tp = int((truth & pred).sum())
        per_category[c] = {"n": int(truth.sum()), "precision": round(tp / max(int(pred.sum()), 1), 3),
                           "recall": round(tp / int(truth.sum()), 3),
                           "fpr": round(float((pred & ~truth).sum()) / max(int((~truth).sum()), 1), 3)}
    langs = {}
    for lang in sorted({e.lang for e in heldout}):
        idx = np.array([e.lang == lang for e in heldout])
        langs[lang] = {"harmful": int((harmful & idx).sum()), "benign": int((~harmful & idx).sum()),
                       "recall": round(float(any_flag[harmful & idx].mean()), 3) if (harmful & idx).any() else None,
                       "fpr": round(float(any_flag[~harmful & idx].mean()), 3) if (~harmful & idx).any() else None}
    ms = np.array(latency) * 1000
    return {"heldout": len(heldout), "harmful": int(harmful.sum()), "benign": int((~harmful).sum()),
            "recall_harmful": round(float(any_flag[harmful].mean()), 3),
            "fpr_benign": round(float(any_flag[~harmful].mean()), 3),
            "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)},
            "per_language": langs, "per_category": per_category,
            "missed": [e.text for e, f in zip(heldout, any_flag) if e.labels and not f],
            "false_positives": [e.text for e, f in zip(heldout, any_flag) if not e.labels and f]}


def evaluate_benign(moderator, rows: list[dict], by_role: bool) -> dict:
    """False-positive rates on held-out benign rows, per source (screened as user messages, or
    with their own `role` when `by_role`), and the flagged texts with what flagged them."""
    roles = [r.get("role", "user") if by_role else "user" for r in rows]
    verdicts = moderator.screen([r["text"] for r in rows], "input", roles=roles)
    flagged = np.array([v.flagged for v in verdicts])
    sources = np.array([r["source"] for r in rows]) if rows else np.array([])
    return {"n": len(rows), "fpr": round(float(flagged.mean()), 4) if rows else None,
            "per_source": {s: {"n": int((sources == s).sum()), "fpr": round(float(flagged[sources == s].mean()), 4)}
                           for s in sorted(set(sources))},
            "false_positives": [{"text": r["text"], "role": role, "reasons": v.reasons}
                                for r, role, v in zip(rows, roles, verdicts) if v.flagged]}


def table(ev: dict) -> str:
    cal = ev["calibration"]
    lines = [f"Trained on {ev['train']} examples; operating point P(not benign) >= {ev['threshold']} (chosen by "
             f"the calibration part ({cal['examples']} training examples set aside) for FPR per source <= "
             f"{cal['target_fpr']}: recall {cal['recall']}, FPR {cal['fpr']}).", "",
             f"Held-out: {ev['harmful']} harmful, {ev['benign']} benign. **Recall on harmful {ev['recall_harmful']}**, "
             f"**false-positive rate on benign {ev['fpr_benign']}**, latency p50 {ev['latency_ms']['p50']} ms / "
             f"p95 {ev['latency_ms']['p95']} ms per request.", "",
             "| category | n | precision | recall | FPR |", "|---|---|---|---|---|"]
    for c, m in ev["per_category"].items():
        lines.append(f"| {c} | {m['n']} | {m['precision']} | {m['recall']} | {m['fpr']} |")
    lines += ["", "| language | harmful | benign | recall | FPR |", "|---|---|---|---|---|"]
    for lang, m in ev["per_language"].items():
        lines.append(f"| {lang} | {m['harmful']} | {m['benign']} | {m['recall']} | {m['fpr']} |")
    benign = [(name, ev[key]) for name, key in (("real text", "real"), ("personas, with their roles", "personas"),
                                                 ("personas, all as user messages", "personas_as_user")) if key in ev]
    if benign:
        lines += ["", "Benign text never trained or calibrated on:", "",
                  "| set | source | n | FPR |", "|---|---|---|---|"]
        for name, b in benign:
            lines.append(f"| {name} | all | {b['n']} | **{b['fpr']}** |")
            lines += [f"| | {src} | {m['n']} | {m['fpr']} |" for src, m in b["per_source"].items()]
    return "\n".join(lines) + "\n"


def fit_classifier(cfg: ModerationStageConfig, examples):
    """The classifier trained on `examples` with the stage's settings."""
    from serve.moderation.classifier import train

    targets = {"labeled": cfg.target_fpr, "real": cfg.target_fpr_real, "personas": cfg.target_fpr_personas}
    return train(examples, epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr, batch_size=cfg.batch_size,
                 target_fpr=targets, calibration=cfg.calibration, seed=cfg.seed)


def train_and_evaluate(cfg: ModerationStageConfig, out: Path) -> dict:
    """Train on the split's train part, save to `out/classifier`, evaluate on the rest."""
    from serve.moderation.classifier import load_labeled, split
    from serve.moderation.moderator import Moderator

    examples = [e for path in labeled_files(cfg) for e in load_labeled(path)]
    train_set, heldout = split(examples, cfg.heldout_every, cfg.heldout_salt)
    benign_train, benign_heldout = benign_sets(cfg)
    classifier = fit_classifier(cfg, train_set + benign_train)
    classifier.save(out / "classifier")
    moderator = Moderator(ModerationConfig(), str(out / "classifier"), classifier=classifier)
    ev = {"train": classifier.meta["train_examples"], "threshold": moderator.threshold,
          "calibration": classifier.meta["calibration"],
          **evaluate(moderator, heldout)}
    if "real" in benign_heldout:
        ev["real"] = evaluate_benign(moderator, benign_heldout["real"], by_role=False)
    if "personas" in benign_heldout:
        ev["personas"] = evaluate_benign(moderator, benign_heldout["personas"], by_role=True)
        ev["personas_as_user"] = evaluate_benign(moderator, benign_heldout["personas"], by_role=False)
    atomic_write_text(out / "eval.json", json.dumps(ev, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "eval.md", table(ev))
    return ev


def run(ctx: StageContext, cfg: ModerationStageConfig) -> StageResult:
    ev = train_and_evaluate(cfg, ctx.stage_dir)
    print(table(ev))
    return StageResult(outputs={"classifier": ctx.stage_dir / "classifier", "eval": ctx.stage_dir / "eval.json"},
                       metrics={"recall_harmful": ev["recall_harmful"], "fpr_benign": ev["fpr_benign"],
                                **{f"fpr_{k}": ev[k]["fpr"] for k in ("real", "personas") if k in ev},
                                "latency_p95_ms": ev["latency_ms"]["p95"]})


def _inputs(_ctx: StageContext, cfg: ModerationStageConfig) -> dict[str, str]:
    from serve.moderation.real_text import PERSONAS, REAL_TEXT

    extra = [p for p, on in ((REAL_TEXT, cfg.real_text), (PERSONAS, cfg.personas)) if on]
    return file_hashes(labeled_files(cfg) + extra, "moderation.labeled")


STAGE = Stage(name="moderation", config_model=ModerationStageConfig, run=run, outside_inputs=_inputs,
              description="fine-tune + evaluate the moderation classifier (MiniLM + lexicon -> softmax head)")
