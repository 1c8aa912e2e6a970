"""`aero submit` against the session's Ray cluster."""

from __future__ import annotations


from tests.conftest import REPO, aero


def test_submit_warns_when_the_run_folder_would_stay_in_the_jobs_temporary_folder(ray_cluster):
    recipe = REPO / "tests" / "data" / "submit-recipe.yaml"  # runs_dir: the default, relative
    # An explicit --address wins over RAY_ADDRESS (here a live cluster that Ray's own client
    # would pick instead): the job is not sent anywhere else.
    result = aero("submit", "data", str(recipe), "--address=http://127.0.0.1:9", env={"RAY_ADDRESS": ray_cluster["address"]})
    assert result.returncode == 2 and "cannot reach the Ray Jobs API" in result.stderr
    assert "warning: runs_dir 'runs' is relative" in result.stderr and "storage: s3://" in result.stderr

