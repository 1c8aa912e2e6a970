"""The pre-flight planner: what each stage of a recipe needs per worker, against what the
cluster has, before anything starts (`aero plan`, and the first thing `aero pipeline` does).

Each stage that holds a model declares its needs through its `Stage.memory` hook
(`WorkerNeed`s: how many workers, RAM and GPU memory per worker, the breakdown, and
cheaper settings to suggest); this module only compares them with a `Capacity`: this
machine, a live Ray cluster (`ray.nodes()`), or a cluster-launcher file's node types.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import UserError

GiB = 2**30

# Memory per GPU by Ray's accelerator type (the `accelerator_type:X` resource / the
# `ray.io/accelerator-type` label), for clusters that do not report it.
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100-80G": 80, "A100": 40, "A100-40G": 40, "L40S": 48, "L4": 24,
                  "A10G": 24, "T4": 16, "V100": 16}


@dataclass
class WorkerNeed:
    """One kind of worker a stage starts: `workers` of them, each needing `ram_bytes` of host
    memory and (on GPU) `gpu_bytes` on its GPU. `parts` is the breakdown; `alternatives` are
    (setting, ram_bytes, gpu_bytes) of cheaper configurations, cheapest change first."""

    stage: str
    role: str
    workers: int
    ram_bytes: int
    gpu_bytes: int = 0
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    parts: dict[str, int] = field(default_factory=dict)
    alternatives: list[tuple[str, int, int]] = field(default_factory=list)
    note: str = ""


@dataclass
class NodeKind:
    """`count` nodes of one kind (a node type's max_workers, or 1 per live node)."""

    name: str
    count: int
    cpus: float
    ram_bytes: int
    gpus: int = 0
    gpu_bytes: int = 0


@dataclass
class Capacity:
    source: str
    nodes: list[NodeKind]

    def total_gpus(self) -> int:
        return sum(n.count * n.gpus for n in self.nodes)


def gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB"


def local_capacity(num_cpus: int | None = None) -> Capacity:
    """This machine, as an embedded local Ray sees it."""
    import psutil

    gpus, gpu_bytes = 0, 0
    try:
        import torch

        if torch.cuda.is_available():
            gpus = torch.cuda.device_count()
            gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    except ImportError:
        pass
    cpus = num_cpus or os.cpu_count() or 1
    return Capacity("this machine", [NodeKind("local", 1, cpus, psutil.virtual_memory().total, gpus, gpu_bytes)])


def _gpu_bytes_for(accelerator: str | None, name: str) -> int:
    if accelerator is None:
        return 0
    if accelerator not in GPU_MEMORY_GIB:
        raise UserError(f"{name}: unknown GPU type {accelerator!r}: memory per GPU is known for "
                        f"{', '.join(GPU_MEMORY_GIB)}")
    return GPU_MEMORY_GIB[accelerator] * GiB


def live_capacity() -> Capacity:
    """The nodes of the Ray cluster this process is connected to (Ray's `memory` resource:
    what it lets tasks and actors use)."""
    import ray

    nodes = []
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        res = node["Resources"]
        accelerator = next((k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")), None)
        gpus = int(res.get("GPU", 0))
        nodes.append(NodeKind(node["NodeManagerAddress"], 1, res.get("CPU", 0), int(res.get("memory", 0)), gpus,
                              _gpu_bytes_for(accelerator, f"node {node['NodeManagerAddress']}") if gpus else 0))
    return Capacity("the live Ray cluster", nodes)


def cluster_file_capacity(path: Path) -> Capacity:
    """The node types of a cluster-launcher file at their max_workers (head: 1). Each type
    states `resources` (CPU, GPU, memory in bytes) and, with GPUs, the label
    `ray.io/accelerator-type`."""
    from cluster.config import read_yaml

    raw = read_yaml(Path(path))
    nodes = []
    for name, spec in (raw.get("available_node_types") or {}).items():
        res = spec.get("resources") or {}
        if "CPU" not in res or "memory" not in res:
            raise UserError(f"{path}: available_node_types.{name}.resources needs CPU and memory (bytes) for "
                            "the planner")
        gpus = int(res.get("GPU", 0))
        accelerator = (spec.get("labels") or {}).get("ray.io/accelerator-type")
        if gpus and accelerator is None:
            raise UserError(f"{path}: available_node_types.{name} has GPUs but no labels.ray.io/accelerator-type")
        count = 1 if name == raw.get("head_node_type") else int(spec.get("max_workers", 0))
        nodes.append(NodeKind(name, count, res["CPU"], int(res["memory"]), gpus,
                              _gpu_bytes_for(accelerator, f"{path}: {name}") if gpus else 0))
    return Capacity(str(path), nodes)


def _fits(need: WorkerNeed, ram: int, gpu: int, capacity: Capacity) -> bool:
    """Whether `need.workers` workers of this size can be placed on the nodes (first fit)."""
    placed = 0
    for node in capacity.nodes:
        if need.gpus_per_worker:
            if not node.gpus or gpu > node.gpu_bytes:
                continue
            per_node = int(node.gpus // need.gpus_per_worker)
        else:
            per_node = int(node.cpus // need.cpus_per_worker) if need.cpus_per_worker else need.workers
        if ram:
            per_node = min(per_node, node.ram_bytes // ram)
        placed += node.count * per_node
    return placed >= need.workers


def check(needs: list[WorkerNeed], capacity: Capacity) -> list[str]:
    """One message per need that does not fit, naming the stage, the figure and what to try."""
    problems = []
    for need in needs:
        if _fits(need, need.ram_bytes, need.gpu_bytes, capacity):
            continue
        if need.gpus_per_worker:
            have = max((n.gpu_bytes for n in capacity.nodes if n.gpus), default=0)
            total = capacity.total_gpus()
            if total < need.workers * need.gpus_per_worker:
                message = (f"{need.stage} needs {need.workers} GPU workers; {capacity.source} has {total} GPUs")
            else:
                message = (f"{need.stage} needs ~{gib(need.gpu_bytes)} per GPU worker ({need.role}); "
                           f"GPUs have {gib(have)}")
        else:
            have = max((n.ram_bytes for n in capacity.nodes), default=0)
            message = (f"{need.stage} needs ~{gib(need.ram_bytes)} of RAM per worker x {need.workers} ({need.role}); "
                       f"the largest node of {capacity.source} has {gib(have)}")
        fixes = [label for label, ram, gpu in need.alternatives if _fits(need, ram, gpu, capacity)]
        problems.append(message + (f"; try {' or '.join(fixes[:2])}" if fixes else
                                   "; no cheaper setting of this stage fits"))
    return problems


def recipe_needs(recipe: Any, stages: list[str] | None = None) -> list[WorkerNeed]:
    """Every listed stage's declared needs (stages without a model declare none)."""
    from cluster.stages import load_stage

    needs: list[WorkerNeed] = []
    for name in stages if stages is not None else recipe.stages:
        stage = load_stage(name)
        if stage.memory is not None:
            needs.extend(stage.memory(recipe, recipe.stage_config(name)))
    return needs


def format_plan(needs: list[WorkerNeed], capacity: Capacity, problems: list[str]) -> str:
    lines = [f"capacity ({capacity.source}): " + "; ".join(
        f"{n.count} x {n.name} ({n.cpus:g} CPU, {gib(n.ram_bytes)}" + (f", {n.gpus} GPU x {gib(n.gpu_bytes)}" if n.gpus
                                                                      else "") + ")" for n in capacity.nodes)]
    lines.append(f"{'stage':<10} {'n':>3} {'RAM/worker':>11} {'GPU/worker':>11}  worker")
    for need in needs:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in need.parts.items() if v)
        lines.append(f"{need.stage:<10} {need.workers:>3} {gib(need.ram_bytes):>11} "
                     f"{gib(need.gpu_bytes) if need.gpus_per_worker else '-':>11}  {need.role}"
                     + (f", {need.note}" if need.note else "") + f": {parts}")
    lines += [f"does not fit: {p}" for p in problems] or ["every stage fits"]
    return "\n".join(lines)


def plan_as_json(needs: list[WorkerNeed], capacity: Capacity, problems: list[str]) -> dict[str, Any]:
    return {
        "capacity": {"source": capacity.source, "nodes": [vars(n) for n in capacity.nodes]},
        "needs": [vars(n) for n in needs],
        "problems": problems,
    }


def preflight(recipe: Any, capacity: Capacity, stages: list[str] | None = None) -> list[WorkerNeed]:
    """Raise a UserError naming every stage that cannot fit; return the needs otherwise."""
    needs = recipe_needs(recipe, stages)
    problems = check(needs, capacity)
    if problems:
        raise UserError("pre-flight: " + " | ".join(problems) + " (aero plan CONFIG shows the whole estimate)")
    return needs


def capacity_for(recipe: Any, *, address: str | None = None, cluster_file: Path | None = None) -> Capacity:
    """A cluster-launcher file's node types when given; else the live cluster the recipe joins
    (`--address`, `ray.address`, RAY_ADDRESS); else this machine."""
    if cluster_file is not None:
        return cluster_file_capacity(cluster_file)
    target = address or recipe.ray.address or os.environ.get("RAY_ADDRESS")
    if target:
        from cluster.ray_session import connect_ray

        connect_ray(recipe.ray, address=target)
        return live_capacity()
    return local_capacity(recipe.ray.num_cpus)


def unfinished(recipe: Any) -> list[str]:
    """The recipe's stages that have no finished manifest yet (what a pipeline run will do)."""
    from cluster.manifest import read_manifest

    out = []
    for name in recipe.stages:
        manifest = read_manifest(recipe.run_dir / name)
        if manifest is None or manifest.status != "finished" or name == "serve":
            out.append(name)
    return out
