"""A local Ray started by `aero cluster up` takes jobs through `aero submit`."""

from __future__ import annotations


import pytest

from cluster.manifest import read_manifest
from tests.conftest import REPO, aero


def test_cluster_status_lists_the_node_and_dashboard(ray_cluster):
    result = aero("cluster", "status", f"--address={ray_cluster['address']}")
    assert result.returncode == 0, result.stderr
    assert f"dashboard: {ray_cluster['dashboard']}" in result.stdout
    assert '"CPU": 2.0' in result.stdout


@pytest.mark.slow
def test_submitted_stage_runs_as_a_ray_job_and_logs_show_it(ray_cluster, tmp_path):
    """`aero submit` ships the project (and pip-installs it in the job's env); the job runs
    the stage against the cluster; `aero jobs logs` shows what it printed."""
    recipe = REPO / "tests" / "data" / "submit-recipe.yaml"
    dashboard = f"--address={ray_cluster['dashboard']}"
    result = aero("submit", "data", str(recipe), f"runs_dir={tmp_path}", f"storage=file://{tmp_path}/store", dashboard,
                  "--follow", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.strip().splitlines()[0]
    assert job_id.startswith("raysubmit_")

    logs = aero("jobs", "logs", job_id, dashboard)
    assert logs.returncode == 0, logs.stderr
    manifest = read_manifest(tmp_path / "submitted/data")
    assert manifest.status == "finished" and manifest.stored_at == f"file://{tmp_path}/store/submitted/data"
    assert read_manifest(tmp_path / "store/submitted/data") == manifest  # the job uploaded its stage folder
    assert "runs_dir" not in result.stderr  # an absolute runs_dir and a store: no warning
    assert f"aero: data: {manifest.metrics['documents_out']} documents kept of {manifest.metrics['documents_in']}" in logs.stdout
    listed = aero("jobs", "list", dashboard)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout

    unknown = aero("jobs", "logs", "raysubmit_nope", dashboard)
    assert unknown.returncode == 2 and "raysubmit_nope" in unknown.stderr

