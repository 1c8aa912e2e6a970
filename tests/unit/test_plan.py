"""The pre-flight planner: estimates from the config alone, checked against a capacity, with
a clear refusal naming the stage, the figures and a setting that fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.config import load_recipe
from cluster.errors import UserError
from cluster.plan import Capacity, NodeKind, check, cluster_file_capacity, preflight, recipe_needs
from tests.conftest import REPO, aero

GiB = 2**30


def _one_node(ram_gib: float, gpus: int = 0, gpu_gib: float = 0) -> Capacity:
    return Capacity("test", [NodeKind("n", 1, 64, int(ram_gib * GiB), gpus, int(gpu_gib * GiB))])


def test_the_tiny_recipe_fits_this_machine_and_every_model_stage_is_estimated():
    out = aero("plan", "configs/tiny-cpu.yaml")
    assert out.returncode == 0, out.stderr + out.stdout
    assert "every stage fits" in out.stdout
    for stage in ("pretrain", "sft", "reward", "dpo", "grpo", "quantize", "serve"):
        assert f"\n{stage} " in out.stdout, stage


def test_model_states_shrink_with_each_zero_stage_and_checkpointing_shrinks_activations():
    recipe = load_recipe(REPO / "configs/gpu-1b.yaml", [])
    by = {}
    for zero in (0, 1, 2, 3):
        recipe.stage_configs["pretrain"] = recipe.stage_config("pretrain").model_copy(
            update={"zero_stage": zero, "activation_checkpointing": False})
        by[zero] = recipe_needs(recipe, ["pretrain"])[0]
    states = [by[z].parts["model_states"] for z in (0, 1, 2, 3)]
    assert states == sorted(states, reverse=True) and states[0] > 5 * states[3]
    # 1.1 B params in bf16 without ZeRO: 2 B weights + 2 B grads + 12 B fp32 master/moments each
    assert 15 * 1.1e9 < states[0] < 18 * 1.1e9
    recipe.stage_configs["pretrain"] = recipe.stage_config("pretrain").model_copy(
        update={"activation_checkpointing": True})
    assert recipe_needs(recipe, ["pretrain"])[0].parts["activations"] < by[3].parts["activations"] / 5


def test_a_stage_that_cannot_fit_is_refused_with_the_figures_and_a_setting_that_fits():
    recipe = load_recipe(REPO / "configs/gpu-125m.yaml", ["pretrain.micro_batch=128", "pretrain.global_batch=1024"])
    problems = check(recipe_needs(recipe, ["pretrain"]), _one_node(2000, gpus=8, gpu_gib=80))
    assert len(problems) == 1
    assert problems[0].startswith("pretrain needs ~") and "per GPU worker" in problems[0]
    assert "GPUs have 80.0 GiB" in problems[0] and "micro_batch 128" in problems[0]
    fix = problems[0].split("try ")[1].split(" or ")[0]
    key, value = fix.rsplit(" ", 1)
    fixed = load_recipe(REPO / "configs/gpu-125m.yaml", ["pretrain.micro_batch=128", "pretrain.global_batch=1024",
                                                         f"{key.replace(' ', '')}={value}"])
    assert check(recipe_needs(fixed, ["pretrain"]), _one_node(2000, gpus=8, gpu_gib=80)) == []


def test_too_few_gpus_and_too_little_ram_are_named():
    recipe = load_recipe(REPO / "configs/gpu-1b.yaml", [])
    problems = check(recipe_needs(recipe, ["pretrain"]), _one_node(2000, gpus=8, gpu_gib=80))
    assert problems == ["pretrain needs 16 GPU workers; test has 8 GPUs; no cheaper setting of this stage fits"]
    tiny = load_recipe(REPO / "configs/tiny-cpu.yaml", [])
    with pytest.raises(UserError, match=r"pre-flight: pretrain needs ~0\.\d GiB of RAM per worker x 2"):
        preflight(tiny, _one_node(0.5), ["pretrain"])


def test_the_pipeline_refuses_before_any_stage_starts(tmp_path: Path):
    recipe = tmp_path / "big.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": "big", "runs_dir": str(tmp_path / "runs"), "stages": ["data", "tokenizer", "pretrain"],
        "data": {"sources": ["stdlib:docs"]}, "tokenizer": {"vocab_size": 32000, "seq_len": 4096},
        "pretrain": {"model": {"preset": "7b"}, "micro_batch": 64, "global_batch": 128, "zero_stage": 0},
    }))
    out = aero("pipeline", str(recipe), "--no-serve", timeout=120)
    error = out.stderr.strip().splitlines()[-1]  # a line before it may say which Ray cluster was joined
    assert out.returncode == 2 and error.startswith("error: pre-flight: pretrain needs ~"), out.stderr
    assert "RAM per worker x 2" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs" / "big" / "data").exists()  # nothing ran


def test_the_cluster_file_is_read_with_its_gpu_type_and_bad_files_are_named(tmp_path: Path):
    capacity = cluster_file_capacity(REPO / "ray_cluster.yaml")
    gpu = next(n for n in capacity.nodes if n.gpus)
    assert (gpu.gpus, gpu.gpu_bytes, gpu.count) == (8, 80 * GiB, 4)
    for recipe in ("gpu-125m", "gpu-1b"):
        out = aero("plan", f"configs/{recipe}.yaml", "--cluster-file", "ray_cluster.yaml")
        assert out.returncode == 0 and "every stage fits" in out.stdout, out.stdout + out.stderr
    raw = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    del raw["available_node_types"]["gpu_worker"]["labels"]
    broken = tmp_path / "cluster.yaml"
    broken.write_text(yaml.safe_dump(raw))
    out = aero("plan", "configs/gpu-1b.yaml", "--cluster-file", str(broken))
    assert out.returncode == 2
    assert "gpu_worker has GPUs but no labels.ray.io/accelerator-type" in out.stderr


