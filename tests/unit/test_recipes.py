"""The GPU recipes are not run here (no GPU): they must load, validate, and fit the cluster
that `ray_cluster.yaml` describes, with DeepSpeed accepting their ZeRO sections."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import REPO

GPUS_PER_INSTANCE = {"p5.48xlarge": 8, "p4d.24xlarge": 8, "g5.12xlarge": 4}
CPUS_PER_INSTANCE = {"p5.48xlarge": 192, "p4d.24xlarge": 96, "g5.12xlarge": 48}
TRAINING = ("pretrain", "sft", "reward", "dpo", "grpo")


def _gpu_pool() -> tuple[int, int, int]:
    """(nodes, GPUs per node, CPUs per node) of the cluster file's GPU worker type."""
    cluster = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    node = cluster["available_node_types"]["gpu_worker"]
    instance = node["node_config"]["InstanceType"]
    return node["max_workers"], GPUS_PER_INSTANCE[instance], CPUS_PER_INSTANCE[instance]


@pytest.mark.parametrize("name, nodes_used", [("gpu-125m", 1), ("gpu-1b", 2)])
def test_gpu_recipes_load_and_fit_the_cluster(name, nodes_used):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from cluster.config import load_recipe
    from jobs.training_config import deepspeed_config

    recipe = load_recipe(REPO / "configs" / f"{name}.yaml", [])
    nodes, gpus_per_node, cpus_per_node = _gpu_pool()
    for stage in TRAINING:
        cfg = recipe.stage_config(stage)
        workers = cfg.scaling.num_workers
        assert cfg.scaling.use_gpu, stage
        assert workers == nodes_used * gpus_per_node <= nodes * gpus_per_node, stage  # one worker per GPU
        assert cfg.scaling.cpus_per_worker * gpus_per_node <= cpus_per_node, stage
        ds = deepspeed_config(cfg, for_hf_trainer=stage != "pretrain")
        DeepSpeedZeroConfig(**ds["zero_optimization"])  # DeepSpeed's own validation of the ZeRO section
        assert ds["zero_optimization"]["stage"] == cfg.zero_stage >= 1
    pre = recipe.stage_config("pretrain")
    assert pre.micro_batch * pre.grad_accum * pre.scaling.num_workers == pre.global_batch
    assert deepspeed_config(pre)["bf16"] == {"enabled": True}
    serve = recipe.stage_config("serve")
    # Every replica of every served model at its autoscaling maximum fits on the GPU pool.
    assert sum(m.deployment.num_gpus * m.deployment.autoscaling.max_replicas for m in serve.models) \
        <= nodes * gpus_per_node
    assert all(m.deployment.num_gpus >= 1 for m in serve.models if m.source)
    assert recipe.stages[-1] == "qa_index" and recipe.stage_config("tokenizer").seq_len >= 1024


def test_the_gpu_1b_recipe_shards_what_a_single_gpu_cannot_hold():
    from cluster.config import load_recipe

    recipe = load_recipe(REPO / "configs" / "gpu-1b.yaml", [])
    pre = recipe.stage_config("pretrain")
    assert pre.model.preset == "1b" and pre.zero_stage == 3 and pre.activation_checkpointing



@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_its_reward_and_judge_halves_differ(path):
    from cluster.config import load_recipe

    recipe = load_recipe(path, [])
    if "judge" in recipe.stages:  # eval's independent judge never shares the training reward model's pairs
        halves = {recipe.stage_config("reward").pairs, recipe.stage_config("judge").pairs}
        assert halves == {"first_half", "second_half"}
        assert recipe.stage_config("eval").judge_stage == "judge"
