"""What stages share through cluster/: references resolved and fingerprinted by StageContext,
the one training vocabulary (old keys name the new ones), and the commands that read a
deployed serve stage's endpoint.json instead of working its paths out again."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from cluster.config import build_recipe
from cluster.errors import ConfigError, UserError
from cluster.manifest import Artifact, Manifest, hash_path, utc_now, write_manifest
from cluster.records import read_history, read_jsonl
from cluster.stage import StageContext


def _finished(run_dir: Path, stage: str, outputs: dict[str, Path]) -> Manifest:
    manifest = Manifest(stage=stage, run=run_dir.name, status="finished", fingerprint=f"fp-{stage}", config={},
                        outputs={k: Artifact(path=str(p), sha256=hash_path(p)) for k, p in outputs.items()},
                        started_at=utc_now())
    write_manifest(run_dir / stage, manifest)
    return manifest


def test_references_resolve_to_stage_outputs_or_folders_and_are_fingerprinted(tmp_path):
    run_dir = tmp_path / "r"
    model = run_dir / "sft" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    sft = _finished(run_dir, "sft", {"model": model})
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    ctx = StageContext(name="eval", run="r", run_dir=run_dir, stage_dir=run_dir / "eval")

    assert ctx.model_dir("sft") == model and ctx.model_dir(str(folder)) == folder
    assert ctx.resolve(str(folder), "index") == folder
    prints = ctx.fingerprints(["sft", str(folder)])
    assert prints == {"stage:sft": sft.output_id, f"path:{folder}": hash_path(folder)}
    (folder / "config.json").write_text('{"a": 2}')  # a changed folder changes its fingerprint
    assert ctx.fingerprints([str(folder)])[f"path:{folder}"] != prints[f"path:{folder}"]
    with pytest.raises(UserError, match="needs stage 'dpo' of run 'r', which has not run"):
        ctx.model_dir("dpo")
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="is not a Hugging Face model folder"):
        ctx.model_dir(str(folder))


@pytest.mark.parametrize("stage,old,new", [
    ("sft", {"per_device_batch": 4}, "micro_batch"),
    ("dpo", {"grad_accum": 2}, "global_batch"),
    ("reward", {"warmup_ratio": 0.1}, "warmup_steps"),
    ("pretrain", {"report_every": 5}, "log_every"),
])
def test_old_training_keys_fail_naming_the_new_key(stage, old, new):
    with pytest.raises(ConfigError, match=rf"{stage}: .*{next(iter(old))} is no longer a key: use {new}"):
        build_recipe({"run": "x", stage: old})


def test_pretrain_and_post_training_share_one_batch_vocabulary():
    recipe = build_recipe({"run": "x", "pretrain": {"micro_batch": 2, "global_batch": 16, "scaling": {"num_workers": 2}},
                           "sft": {"micro_batch": 4, "scaling": {"num_workers": 3}},
                           "dpo": {"micro_batch": 2, "global_batch": 8}})
    pre, sft, dpo = (recipe.stage_config(s) for s in ("pretrain", "sft", "dpo"))
    assert (pre.global_batch, pre.grad_accum) == (16, 4)
    assert (sft.global_batch, sft.grad_accum) == (12, 1)  # default: no accumulation
    assert (dpo.global_batch, dpo.grad_accum) == (8, 2)
    with pytest.raises(ConfigError, match="global_batch 10 is not divisible by micro_batch x num_workers = 4"):
        build_recipe({"run": "x", "sft": {"micro_batch": 2, "global_batch": 10}})
    with pytest.raises(ConfigError, match="warmup_steps 30 must be below steps 30"):
        build_recipe({"run": "x", "grpo": {"warmup_steps": 30}})
    with pytest.raises(ConfigError, match="sft.scaling: Input should be a valid dictionary"):
        build_recipe({"run": "x", "sft": {"scaling": 4}})  # a clear error, not a crash in the batch default


def test_jsonl_records_and_a_metrics_history_keep_the_last_entry_per_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert read_jsonl(log) == [] and read_history(log) == []
    log.write_text('{"step": 1, "loss": 3}\n\n{"step": 2, "loss": 2}\n{"step": 1, "loss": 2.5}\n')
    assert len(read_jsonl(log)) == 3 and read_jsonl(log, limit=1) == [{"step": 1, "loss": 3}]
    assert read_history(log) == [{"step": 1, "loss": 2.5}, {"step": 2, "loss": 2}]


def test_moderation_report_and_feedback_export_read_the_deployed_serve_stages_paths(tmp_path):
    from serve.feedback.export import export_from
    from serve.moderation.audit import report_for

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"run: r\nruns_dir: {tmp_path / 'runs'}\n")
    with pytest.raises(UserError, match="run 'r' has no deployed serve stage"):
        report_for(recipe_file)
    with pytest.raises(UserError, match="run 'r' has no deployed serve stage"):
        export_from(str(recipe_file))

    audit = tmp_path / "elsewhere" / "audit.jsonl"  # not where the recipe alone would put it
    audit.parent.mkdir()
    audit.write_text(json.dumps({"ts": time.time(), "direction": "input", "action": "block",
                                 "flagged": ["violence"], "role": "user"}) + "\n")
    serve_dir = tmp_path / "runs" / "r" / "serve"
    serve_dir.mkdir(parents=True)
    endpoint = serve_dir / "endpoint.json"
    endpoint.write_text(json.dumps({"audit_log": str(audit), "feedback_db": f"sqlite:///{tmp_path / 'none.db'}"}))
    _finished(tmp_path / "runs" / "r", "serve", {"endpoint": endpoint})

    report = json.loads(report_for(recipe_file, "1h", as_json=True))
    assert report["screened"] == {"input": 1} and report["flagged"]["input"]["violence"]["count"] == 1
    with pytest.raises(UserError, match="no feedback database at .*none.db"):
        export_from(str(recipe_file))
