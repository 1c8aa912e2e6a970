"""`aero cluster k8s`: KubeRay manifests from the GPU recipes, shaped like ray_cluster.yaml's
machines, with pod templates that pass Kubernetes' own strict PodTemplate schema and a Serve
config that passes Ray Serve's schema."""

from __future__ import annotations

import copy

import pytest
import ray
import yaml

from cluster.errors import UserError
from tests.conftest import REPO, aero

GPU_RECIPES = ("gpu-125m", "gpu-1b")


def _load(name: str, **kubernetes):
    from cluster.config import load_recipe

    recipe = load_recipe(REPO / "configs" / f"{name}.yaml", [])
    recipe.kubernetes = {**recipe.kubernetes, **kubernetes}
    return recipe


def _groups(spec: dict) -> dict[str, dict]:
    """{node type: group} of a RayCluster spec, the head as `head`."""
    out = {"head": spec["headGroupSpec"]}
    for g in spec["workerGroupSpecs"]:
        out[g["template"]["metadata"]["labels"]["aerollms/node-type"]] = g
    return out


@pytest.mark.parametrize("name", GPU_RECIPES)
def test_the_manifests_carry_the_cluster_files_machines_and_the_recipes_image(name, monkeypatch):
    from cluster.k8s import IMAGE_PROJECT, manifests

    monkeypatch.chdir(REPO)
    cluster_file = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    recipe = _load(name)
    out = manifests(recipe, f"{IMAGE_PROJECT}/configs/{name}.yaml")
    assert set(out) == {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml"}
    assert recipe.kubernetes["image"] == cluster_file["docker"]["image"]
    job = out["rayjob.yaml"]
    assert job["spec"]["entrypoint"] == f"aero pipeline {IMAGE_PROJECT}/configs/{name}.yaml --no-serve"
    for manifest, spec in ((out["raycluster.yaml"], out["raycluster.yaml"]["spec"]), (job, job["spec"]["rayClusterSpec"]),
                           (out["rayservice.yaml"], out["rayservice.yaml"]["spec"]["rayClusterConfig"])):
        assert manifest["apiVersion"] == "ray.io/v1" and manifest["metadata"]["namespace"] == "aerollms"
        groups = _groups(spec)
        assert set(groups) == set(cluster_file["available_node_types"])
        for node_type, group in groups.items():
            node = cluster_file["available_node_types"][node_type]
            container = group["template"]["spec"]["containers"][0]
            limits = container["resources"]["limits"]
            assert container["image"] == recipe.kubernetes["image"]
            assert float(limits["cpu"]) == node["resources"]["CPU"]
            assert int(limits.get("nvidia.com/gpu", 0)) == node["resources"].get("GPU", 0)
            # Ray is told the cluster file's memory exactly; the object store fits beside it in the pod.
            params = group["rayStartParams"]
            assert int(params["memory"]) == node["resources"]["memory"]
            pod_bytes = int(limits["memory"].removesuffix("Gi")) * 2**30
            assert int(params["memory"]) + int(params["object-store-memory"]) == pod_bytes
            assert container["volumeMounts"][0]["mountPath"] == str(recipe.runs_dir)
            secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
            assert secrets == {"RAY_AUTH_TOKEN": {"name": f"{name}-ray-token", "key": "token"},
                               "AERO_API_KEYS": {"name": f"{name}-api-keys", "key": "keys"}}
            if node_type != "head":
                assert (group["minReplicas"], group["maxReplicas"]) == (node["min_workers"], node["max_workers"])
            if node["resources"].get("GPU"):
                assert params["labels"] == f"ray.io/accelerator-type={node['labels']['ray.io/accelerator-type']}"
        assert spec["rayVersion"] == ray.__version__
    serve = yaml.safe_load(out["rayservice.yaml"]["spec"]["serveConfigV2"])
    assert serve["applications"][0]["import_path"] == "serve.app:recipe_app_builder"
    assert serve["applications"][0]["args"] == {"recipe": f"{IMAGE_PROJECT}/configs/{name}.yaml"}


def test_the_planner_sees_the_same_machines(monkeypatch):
    """`aero plan --cluster-file ray_cluster.yaml` and the KubeRay groups describe one cluster."""
    from cluster.k8s import node_groups
    from cluster.plan import cluster_file_capacity

    capacity = cluster_file_capacity(REPO / "ray_cluster.yaml")
    planned = {n.name: (n.cpus, n.ram_bytes, n.gpus) for n in capacity.nodes}
    grouped = {g.name: (g.cpus, g.memory, g.gpus) for g in node_groups(REPO / "ray_cluster.yaml")}
    assert planned == grouped


def test_a_pod_template_field_kubernetes_does_not_know_is_named():
    from cluster.k8s import check_manifest, manifests

    out = manifests(_load("gpu-125m", cluster_file=str(REPO / "ray_cluster.yaml")), "/x/recipe.yaml")
    bad = copy.deepcopy(out["raycluster.yaml"])
    bad["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(UserError, match=r"raycluster.yaml: workerGroupSpecs\[gpu-worker\].template.spec.containers.0: "
                                        r"Additional properties are not allowed \('resource' was unexpected\)"):
        check_manifest("raycluster.yaml", bad)
    bad = copy.deepcopy(out["rayservice.yaml"])
    bad["spec"]["serveConfigV2"] = "applications: [{name: aero}]"
    with pytest.raises(UserError, match="rayservice.yaml: spec.serveConfigV2: .*import_path"):
        check_manifest("rayservice.yaml", bad)


def test_bad_kubernetes_settings_are_refused_by_name(tmp_path, monkeypatch):
    from cluster.errors import ConfigError
    from cluster.k8s import manifests

    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError, match="kubernetes.namespace"):
        manifests(_load("gpu-1b", namespace="Not_A_Name"), "/r.yaml")
    long_run = _load("gpu-1b")
    long_run.run = "r" * 60
    with pytest.raises(ConfigError, match="from the run's name.*set kubernetes.name"):
        manifests(long_run, "/r.yaml")
    with pytest.raises(ConfigError, match="kubernetes.imag: unknown key"):
        manifests(_load("gpu-1b", imag="x"), "/r.yaml")
    with pytest.raises(ConfigError, match="differs from ray_cluster.yaml's docker.image"):
        manifests(_load("gpu-1b", image="other:1"), "/r.yaml")
    with pytest.raises(ConfigError, match="node_memory_share 0.71: a head pod of 44 GiB leaves 0.0 GiB"):
        manifests(_load("gpu-1b", node_memory_share=0.71), "/r.yaml")
    broken = tmp_path / "cluster.yaml"
    broken.write_text(yaml.safe_dump({"head_node_type": "head", "available_node_types": {"head": {"resources": {"CPU": 4}}}}))
    with pytest.raises(ConfigError, match="available_node_types.head.resources needs CPU and memory"):
        manifests(_load("gpu-1b", cluster_file=str(broken)), "/r.yaml")


def test_the_cli_writes_the_files_and_refuses_a_recipe_without_the_section(tmp_path):
    out = tmp_path / "k8s"
    done = aero("cluster", "k8s", "configs/gpu-1b.yaml", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
    cluster = yaml.safe_load((out / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster" and cluster["metadata"]["name"] == "gpu-1b"
    missing = aero("cluster", "k8s", "configs/tiny-cpu.yaml", "--out", str(tmp_path / "none"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == "error: configs/tiny-cpu.yaml has no kubernetes: section (at least kubernetes.image)"
    assert not (tmp_path / "none").exists()
    outside = tmp_path / "mine.yaml"
    outside.write_text((REPO / "configs/gpu-1b.yaml").read_text())
    refused = aero("cluster", "k8s", str(outside), "--out", str(tmp_path / "o2"))
    assert refused.returncode == 2 and "--recipe-path" in refused.stderr
