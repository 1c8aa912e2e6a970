"""Recipes: YAML + overlays + key.sub=value overrides, validated by each stage's own model."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import apply_overrides, load_recipe, parse_override
from cluster.errors import ConfigError
from data_jobs.corpus_stage import CorpusConfig
from tests.conftest import REPO, aero


def test_override_values_are_read_as_yaml():
    assert parse_override("data.max_doc_chars=10") == (["data", "max_doc_chars"], 10)
    assert parse_override("ray.dashboard=false") == (["ray", "dashboard"], False)
    assert parse_override("data.sources=[a, b]") == (["data", "sources"], ["a", "b"])
    assert parse_override("run=my-run") == (["run"], "my-run")
    assert parse_override("data.text_field=") == (["data", "text_field"], "")


@pytest.mark.parametrize("bad", ["novalue", "=3", "a..b=1"])
def test_malformed_override_is_rejected(bad):
    with pytest.raises(ConfigError, match="override"):
        parse_override(bad)


def test_override_into_a_scalar_names_the_key():
    with pytest.raises(ConfigError, match="run is a str, not a section"):
        apply_overrides({"run": "x"}, ["run.sub=1"])


def test_default_recipe_loads_and_overrides_apply():
    recipe = load_recipe(REPO / "configs/tiny-cpu.yaml", ["data.max_doc_chars=123", "run=other"])
    assert recipe.run == "other"
    assert recipe.stages == ["data", "tokenizer", "pretrain", "chat_data", "sft", "reward", "judge", "dpo", "grpo", "sparsify", "quantize",
                             "eval", "moderation", "qa_index", "serve"]
    config = recipe.stage_config("data")
    assert isinstance(config, CorpusConfig) and config.max_doc_chars == 123


def test_overlay_merges_sections(tmp_path):
    overlay = tmp_path / "best.yaml"
    overlay.write_text("data:\n  max_doc_chars: 77\n")
    recipe = load_recipe(REPO / "configs/tiny-cpu.yaml", overlays=[overlay])
    assert recipe.stage_config("data").max_doc_chars == 77
    assert recipe.stage_config("data").sources[0] == "stdlib:docs"  # rest of the section kept


@pytest.mark.parametrize(
    "text, needle",
    [
        ("run: r\ndata:\n  sorces: [x]\n", "data.sorces: unknown key"),
        ("run: r\ndata:\n  max_doc_chars: lots\n", "data.max_doc_chars: Input should be a valid integer"),
        ("run: r\nray:\n  num_cpus: 0\n", "ray.num_cpus: Input should be greater than or equal to 1"),
        ("run: r\npretrian: {}\n", "pretrian: unknown key"),
        ("runs_dir: x\n", "run: required key is missing"),
        ("run: 'a/b'\n", "run: Value error, must be a folder name"),
        ("run: r\nstages: [data, dat]\n", "stages.1: unknown stage 'dat'"),
        ("run: [unclosed\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        # custom Ray resources: CPU/GPU have their own keys, amounts are positive
        ("run: r\npretrain:\n  scaling: {resources: {CPU: 2}}\n", "pretrain.scaling.resources: Value error, CPU is set with this section's own keys"),
        ("run: r\nsft:\n  scaling: {resources: {pool: 0}}\n", "every amount must be > 0"),
        ("run: r\ndata:\n  task_resources: {CPU: 1, GPU: 1}\n", "CPU and GPU are set with this section's own keys"),
        ("run: r\ndata:\n  task_resources: {pool: many}\n", "data.task_resources.pool: Input should be a valid number"),
        ("run: r\nserve:\n  models: [{name: m, source: sft, deployment: {resources: {GPU: 1}}}]\n",
         "deployment.resources: Value error, GPU is set with this section's own keys"),
        ("run: r\nserve:\n  models: [{name: m, source: sft, cpu_threads: 'all'}]\n", "serve.models.0.cpu_threads"),
        ("run: r\nkubernetes: [x]\n", "kubernetes: Input should be a valid dictionary"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    assert str(path) in str(info.value)
    assert needle in str(info.value)


def test_cli_config_errors_exit_2_with_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run: r\nstages: [data]\ndata:\n  max_doc_chars: lots\n")
    for args in (["run", "data", str(path)], ["pipeline", str(path)], ["pipeline", str(tmp_path / "missing.yaml")]):
        result = aero(*args)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ")
    assert "data.max_doc_chars" in aero("run", "data", str(path)).stderr
    assert "missing.yaml: config file not found" in aero("pipeline", str(tmp_path / "missing.yaml")).stderr


def test_cli_override_with_wrong_type_names_the_key(tmp_path):
    result = aero("pipeline", str(REPO / "configs/tiny-cpu.yaml"), "ray.num_cpus=two")
    assert result.returncode == 2
    assert "ray.num_cpus" in result.stderr and "'two'" in result.stderr


def test_every_shipped_recipe_validates():
    recipes = sorted(Path(REPO / "configs").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        for name in recipe.stages:
            recipe.stage_config(name)

