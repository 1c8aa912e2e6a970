"""The `aero` command line without Ray: help everywhere, versions, and user errors as one line with exit 2."""

from __future__ import annotations

import pytest

from tests.conftest import aero

COMMANDS = [
    [], ["run"], ["pipeline"], ["submit"], ["version"], ["jobs"], ["jobs", "list"], ["jobs", "logs"],
    ["jobs", "stop"], ["cluster"], ["cluster", "up"], ["cluster", "down"], ["cluster", "status"],
    ["runs"], ["runs", "list"], ["runs", "show"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "aero")
def test_every_command_has_help(command):
    result = aero(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_version_names_the_stack():
    result = aero("version")
    assert result.returncode == 0
    for name in ("aerollms", "ray", "torch", "deepspeed", "transformers", "vllm"):
        line = next(l for l in result.stdout.splitlines() if l.startswith(name + " ") or l.startswith(name + "-cpu "))
        assert "not installed" not in line, line
    assert "ray 2.60" in result.stdout


def test_unknown_stage_is_a_user_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: r\nstages: [data]\n")
    result = aero("run", "pretrian", str(recipe))
    assert result.returncode == 2
    assert "unknown stage 'pretrian'" in result.stderr
    assert "Traceback" not in result.stderr


def test_runs_show_of_missing_run_is_a_user_error(tmp_path):
    result = aero("runs", "show", "nope", f"--runs-dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: run 'nope' not found in {tmp_path}"


def test_submit_outside_project_is_refused_before_contacting_ray(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run: r\nstages: [data]\n")
    result = aero("submit", "pipeline", str(recipe), "--address=http://127.0.0.1:9")
    assert result.returncode == 2
    assert "inside the project folder" in result.stderr


