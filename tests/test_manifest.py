"""Manifests are atomic; finished stages are skipped, changed ones rerun, failed ones resume."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import load_recipe
from cluster.manifest import Manifest, read_manifest, utc_now, write_manifest
from cluster.runner import run_stage
from tests.conftest import write_recipe


def _manifest(status: str) -> Manifest:
    return Manifest(stage="s", run="r", status=status, fingerprint="f", config={}, started_at=utc_now())


def test_manifest_write_is_atomic_when_killed_mid_write(tmp_path, monkeypatch):
    write_manifest(tmp_path, _manifest("running"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(tmp_path, _manifest("finished"))
    monkeypatch.undo()
    assert read_manifest(tmp_path).status == "running"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_torn_manifest_reads_as_absent(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stage": "s", "status": "fini')
    assert read_manifest(tmp_path) is None


def test_stage_is_skipped_on_rerun_and_rerun_when_config_changes(ray_cluster, tmp_path, small_corpus):
    recipe_path = write_recipe(tmp_path / "r.yaml", run="skip", runs_dir=tmp_path / "runs", sources=[str(small_corpus)])
    runner = CliRunner()

    first = runner.invoke(app, ["run", "data", str(recipe_path)])
    assert first.exit_code == 0, first.output
    m1 = read_manifest(tmp_path / "runs/skip/data")
    assert m1.status == "finished" and m1.metrics["documents_out"] == 5

    second = runner.invoke(app, ["pipeline", str(recipe_path)])
    assert second.exit_code == 0, second.output
    assert "skipped" in second.output
    assert read_manifest(tmp_path / "runs/skip/data").started_at == m1.started_at

    third = runner.invoke(app, ["run", "data", str(recipe_path), "data.max_doc_chars=20"])
    assert third.exit_code == 0, third.output
    m3 = read_manifest(tmp_path / "runs/skip/data")
    assert m3.fingerprint != m1.fingerprint
    assert m3.config["max_doc_chars"] == 20
    assert m3.metrics["rejected_total"] >= 1  # the long note is now over the limit

    # An input file changes: the stage reruns too.
    (small_corpus / "extra.txt").write_text("New doc.")
    load = load_recipe(recipe_path, ["data.max_doc_chars=20"])
    m4 = run_stage(load, "data")
    assert m4.inputs != m3.inputs and m4.metrics["documents_out"] == m3.metrics["documents_out"] + 1


def test_failed_stage_is_recorded_and_resumes_on_rerun(ray_cluster, tmp_path, small_corpus):
    """A stage that fails (here: a file squats where it must write its documents folder)
    leaves a `failed` manifest with the error; once fixed, the rerun (same fingerprint)
    resumes in the same folder, keeps the parts already cleaned, and finishes."""
    recipe_path = write_recipe(tmp_path / "r.yaml", run="fail", runs_dir=tmp_path / "runs", sources=[str(small_corpus)])
    stage_dir = tmp_path / "runs/fail/data"
    stage_dir.mkdir(parents=True)
    (stage_dir / "documents").write_text("not a folder")
    recipe = load_recipe(recipe_path)
    with pytest.raises(NotADirectoryError):
        run_stage(recipe, "data")
    failed = read_manifest(stage_dir)
    assert failed.status == "failed" and "NotADirectoryError" in failed.error

    (stage_dir / "documents").unlink()
    messages = []
    resumed = run_stage(recipe, "data", echo=messages.append)
    assert any("resuming" in m for m in messages)
    assert resumed.status == "finished" and resumed.fingerprint == failed.fingerprint
    stats = json.loads((stage_dir / "stats.json").read_text())
    assert stats["documents_out"] == 5


@pytest.mark.slow
def test_default_recipe_runs_and_runs_show_prints_its_lineage(ray_cluster, tmp_path):
    """The README's demo recipe's corpus stages (pretraining through `aero pipeline` is
    tests/test_pipeline.py's), then `aero runs list/show` read its manifests."""
    from tests.conftest import REPO

    runner = CliRunner()
    result = runner.invoke(app, ["pipeline", str(REPO / "configs/tiny-cpu.yaml"), f"runs_dir={tmp_path}",
                                 "stages=[data, tokenizer]"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "tiny-cpu/data")
    assert manifest.status == "finished"
    assert manifest.metrics["documents_by_kind"]["code"] >= 1
    assert manifest.metrics["documents_out"] > 80  # pydoc topics + json sources + samples
    assert manifest.versions["ray"].startswith("2.60")
    assert "report: " in result.output and "funnel.png" in (tmp_path / "tiny-cpu" / "report.html").read_text()

    listed = runner.invoke(app, ["runs", "list", f"--runs-dir={tmp_path}"])
    assert "tiny-cpu\tdata=finished" in listed.output
    shown = runner.invoke(app, ["runs", "show", "tiny-cpu", f"--runs-dir={tmp_path}"])
    assert shown.exit_code == 0, shown.output
    assert f"out  documents: {tmp_path}/tiny-cpu/data/documents sha256 {manifest.outputs['documents'].sha256[:12]}" in shown.output
    assert "in   source:stdlib:docs:" in shown.output
    as_json = runner.invoke(app, ["runs", "show", "tiny-cpu", f"--runs-dir={tmp_path}", "--json"])
    assert json.loads(as_json.output)[0]["fingerprint"] == manifest.fingerprint


def test_later_stages_depend_on_what_a_stage_wrote_not_only_on_its_config():
    """A stage rerun with the same config that writes different outputs (new code) changes
    the id that later stages fingerprint, so they rerun too."""
    from cluster.manifest import Artifact

    base = dict(stage="chat_data", run="r", status="finished", fingerprint="f" * 64, config={}, started_at=utc_now())
    first = Manifest(**base, outputs={"sft_train": Artifact(path="a", sha256="1" * 64)})
    same = Manifest(**base, outputs={"sft_train": Artifact(path="a", sha256="1" * 64)})
    rewritten = Manifest(**base, outputs={"sft_train": Artifact(path="a", sha256="2" * 64)})
    assert first.output_id == same.output_id != rewritten.output_id


def test_artifact_store_round_trips_a_stage_folder_manifest_last_and_names_bad_uris(tmp_path):
    from cluster.artifact_store import ArtifactStore
    from cluster.config import build_recipe
    from cluster.errors import ConfigError, UserError

    stage_dir = tmp_path / "local" / "r" / "s"
    (stage_dir / "model").mkdir(parents=True)
    (stage_dir / "model" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (stage_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (stage_dir / "ray_results" / "ckpt").mkdir(parents=True)  # already in the store when a store is set
    write_manifest(stage_dir, _manifest("finished"))
    store = ArtifactStore(f"file://{tmp_path}/store/")
    assert store.push(stage_dir, "r", "s") == f"file://{tmp_path}/store/r/s"
    assert (tmp_path / "store/r/s/model/weights.bin").read_bytes() == b"\x00\x01" * 100
    assert not (tmp_path / "store/r/s/ray_results").exists()
    fresh = tmp_path / "fresh" / "r" / "s"
    assert store.pull("r", "s", fresh).status == "finished"
    assert (fresh / "metrics.jsonl").read_text() == '{"step": 1}\n' and read_manifest(fresh).fingerprint == "f"
    # A folder whose manifest is not finished (an upload cut short, a failed stage) is not restored.
    write_manifest(tmp_path / "store/r/s", _manifest("running"))
    assert store.pull("r", "s", tmp_path / "again" / "s") is None and not (tmp_path / "again").exists()
    assert store.read_manifest("r", "missing") is None
    # Object-store URIs keep their query (endpoint, region) at the end; nothing is contacted here.
    s3 = ArtifactStore("s3://bucket/runs?region=us-east-1&endpoint_override=127.0.0.1:9000")
    assert s3.stage_uri("r", "pretrain", "ray_results") == \
        "s3://bucket/runs/r/pretrain/ray_results?region=us-east-1&endpoint_override=127.0.0.1:9000"
    with pytest.raises(UserError, match="storage 'foo://x': pyarrow cannot open it"):
        ArtifactStore("foo://x")
    with pytest.raises(ConfigError, match="storage: Value error, must be a URI such as s3://"):
        build_recipe({"run": "x", "storage": "runs/shared"})
