"""Finished stages are skipped, changed ones rerun, failed ones resume (on the session's Ray)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.config import load_recipe
from cluster.manifest import read_manifest
from cluster.runner import run_stage
from tests.conftest import write_recipe


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
    tests/integration/test_pipeline.py's), then `aero runs list/show` read its manifests."""
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


