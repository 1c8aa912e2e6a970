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
from cluster.manifest import atomic_write_text, sha256_file
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
    target_fpr: float = Field(default=0.05, gt=0, lt=1,
                              description="the operating point: false-positive rate on the calibration part's "
                                          "benign examples")


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


def table(ev: dict) -> str:
    lines = [f"Trained on {ev['train']} examples; operating point P(not benign) >= {ev['threshold']} (chosen by "
             f"the calibration part ({ev['calibration']['examples']} training examples set aside) for FPR <= "
             f"{ev['calibration']['target_fpr']}: recall {ev['calibration']['recall']}, FPR {ev['calibration']['fpr']}).", "",
             f"Held-out: {ev['harmful']} harmful, {ev['benign']} benign. **Recall on harmful {ev['recall_harmful']}**, "
             f"**false-positive rate on benign {ev['fpr_benign']}**, latency p50 {ev['latency_ms']['p50']} ms / "
             f"p95 {ev['latency_ms']['p95']} ms per request.", "",
             "| category | n | precision | recall | FPR |", "|---|---|---|---|---|"]
    for c, m in ev["per_category"].items():
        lines.append(f"| {c} | {m['n']} | {m['precision']} | {m['recall']} | {m['fpr']} |")
    lines += ["", "| language | harmful | benign | recall | FPR |", "|---|---|---|---|---|"]
    for lang, m in ev["per_language"].items():
        lines.append(f"| {lang} | {m['harmful']} | {m['benign']} | {m['recall']} | {m['fpr']} |")
    return "\n".join(lines) + "\n"


def fit_classifier(cfg: ModerationStageConfig, examples):
    """The classifier trained on `examples` with the stage's settings."""
    from serve.moderation.classifier import train

    return train(examples, epochs=cfg.epochs, lr=cfg.lr, head_lr=cfg.head_lr, batch_size=cfg.batch_size,
                 target_fpr=cfg.target_fpr, calibration=cfg.calibration, seed=cfg.seed)


def train_and_evaluate(cfg: ModerationStageConfig, out: Path) -> dict:
    """Train on the split's train part, save to `out/classifier`, evaluate on the rest."""
    from serve.moderation.classifier import load_labeled, split
    from serve.moderation.moderator import Moderator

    examples = [e for path in labeled_files(cfg) for e in load_labeled(path)]
    train_set, heldout = split(examples, cfg.heldout_every, cfg.heldout_salt)
    classifier = fit_classifier(cfg, train_set)
    classifier.save(out / "classifier")
    moderator = Moderator(ModerationConfig(), str(out / "classifier"), classifier=classifier)
    ev = {"train": classifier.meta["train_examples"], "threshold": moderator.threshold,
          "calibration": classifier.meta["calibration"],
          **evaluate(moderator, heldout)}
    atomic_write_text(out / "eval.json", json.dumps(ev, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "eval.md", table(ev))
    return ev


def run(ctx: StageContext, cfg: ModerationStageConfig) -> StageResult:
    ev = train_and_evaluate(cfg, ctx.stage_dir)
    print(table(ev))
    return StageResult(outputs={"classifier": ctx.stage_dir / "classifier", "eval": ctx.stage_dir / "eval.json"},
                       metrics={"recall_harmful": ev["recall_harmful"], "fpr_benign": ev["fpr_benign"],
                                "latency_p95_ms": ev["latency_ms"]["p95"]})


def _inputs(_ctx: StageContext, cfg: ModerationStageConfig) -> dict[str, str]:
    from cluster.errors import UserError

    out = {}
    for path in labeled_files(cfg):
        if not path.is_file():
            raise UserError(f"moderation.labeled: {path} does not exist")
        out[str(path)] = sha256_file(path)
    return out


STAGE = Stage(name="moderation", config_model=ModerationStageConfig, run=run, outside_inputs=_inputs,
              description="fine-tune + evaluate the moderation classifier (MiniLM + lexicon -> softmax head)")
