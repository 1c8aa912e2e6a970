"""`aero cluster k8s RECIPE`: KubeRay manifests from a recipe, for running AeroLLMs on
Kubernetes the way Ray is most often run there (the KubeRay operator).

- `raycluster.yaml`: a RayCluster with a head group and one worker group per worker node
  type (CPU pool, GPU pool), with the autoscaler on and each group's min/max replicas;
- `rayjob.yaml`: a RayJob that runs `aero pipeline RECIPE --no-serve` on a cluster of the same
  shape, torn down when the job ends;
- `rayservice.yaml`: a RayService whose Serve config deploys the recipe's `serve` stage, with
  model paths resolved from the finished run when the Serve app starts.

The node groups' CPUs, GPUs, memory and autoscaling bounds are read from the cluster-launcher
file (`ray_cluster.yaml`), so `aero plan --cluster-file`, `ray up` and Kubernetes describe the
same machines; the image, namespace and the volume that holds the runs come from the recipe's
`kubernetes:` section (`docker.image` of the cluster file must name the same image).

Each pod template is checked against Kubernetes' own PodTemplate schema (the
kubernetes-validate package, strict: unknown fields are errors) and the Serve config against
Ray Serve's `ServeDeploySchema` before anything is written. KubeRay's own CRD schemas are not
shipped (docs/kubernetes.md says why), so the ray.io fields outside the pod templates are not
schema-checked here.

Written by hand because no maintained library emits KubeRay manifests from a Ray
cluster-launcher description; the manifests are plain dicts dumped as YAML.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, field_validator

from cluster.config import StrictModel, read_yaml, validate_section
from cluster.errors import ConfigError, UserError
from cluster.manifest import atomic_write_text

KUBERAY_API = "ray.io/v1"
KUBERNETES_VERSION = "1.33.0"  # the API version the pod templates are validated against
# The cluster file's `memory` is Ray's memory resource, ~70% of the machine's RAM (Ray keeps
# the rest for its object store). A pod asks for a share of that RAM (`node_memory_share`: the
# kubelet and daemon sets need the rest); Ray is told its `memory` exactly and the object store
# gets what is left of the pod.
RAY_MEMORY_SHARE = 0.7
IMAGE_PROJECT = "/home/ray/aerollms"  # where the Dockerfile installs the project
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class KubernetesConfig(StrictModel):
    """The recipe's `kubernetes:` section."""

    image: str = Field(description="an image with AeroLLMs installed (see the Dockerfile); every Ray pod runs it")
    namespace: str = "default"
    name: str | None = Field(default=None, description="the RayCluster / RayJob / RayService name (default: the run)")
    cluster_file: Path = Field(default=Path("ray_cluster.yaml"), description="the cluster-launcher file whose node "
                               "types give each group's CPUs, GPUs, memory and min/max workers")
    runs_volume_claim: str | None = Field(default=None, description="a PersistentVolumeClaim (ReadWriteMany) "
                                          "mounted at runs_dir on every pod, so stages on any node share the run")
    node_memory_share: float = Field(default=0.9, gt=0, le=1, description="the share of a machine's RAM a Ray "
                                     "pod asks for (the kubelet and daemon sets need the rest)")
    token_secret: str | None = Field(default=None, description="with ray.auth: token, the Secret whose key "
                                     "`token` every pod reads as RAY_AUTH_TOKEN (default: NAME-ray-token)")
    api_keys_secret: str | None = Field(default=None, description="with serving auth on, the Secret whose key `keys` "
                                        "every pod reads as the serve section's keys_env (default: NAME-api-keys)")
    gpu_toleration: bool = Field(default=True, description="tolerate the nvidia.com/gpu NoSchedule taint on GPU groups")
    idle_timeout_s: int = Field(default=600, ge=0, description="the autoscaler removes a worker idle this long")
    job_ttl_s: int = Field(default=3600, ge=0, description="how long a finished RayJob's cluster is kept")

    @field_validator("namespace", "name", "runs_volume_claim", "token_secret", "api_keys_secret")
    @classmethod
    def _dns_label(cls, value: str | None) -> str | None:
        if value is not None and (len(value) > 63 or not _DNS_LABEL.match(value)):
            raise ValueError(f"{value!r} is not a Kubernetes name (lowercase letters, digits and '-', at most 63)")
        return value


class NodeGroup(StrictModel):
    """One node type of the cluster file, as a pod shape."""

    name: str
    head: bool
    cpus: float
    memory: int  # bytes: Ray's `memory` resource
    gpus: int = 0
    accelerator: str | None = None
    min_workers: int = 0
    max_workers: int = 0


def node_groups(path: Path) -> list[NodeGroup]:
    """The cluster file's node types, head first; each must state CPU and memory."""
    if not path.is_file():
        raise UserError(f"kubernetes.cluster_file: {path} does not exist")
    raw = read_yaml(path)
    head = raw.get("head_node_type")
    types = raw.get("available_node_types") or {}
    if head not in types:
        raise ConfigError(f"{path}: head_node_type {head!r} is not one of available_node_types")
    groups = []
    for name, spec in types.items():
        res = spec.get("resources") or {}
        if "CPU" not in res or "memory" not in res:
            raise ConfigError(f"{path}: available_node_types.{name}.resources needs CPU and memory (bytes)")
        groups.append(NodeGroup(
            name=name, head=name == head, cpus=res["CPU"], memory=int(res["memory"]), gpus=int(res.get("GPU", 0)),
            accelerator=(spec.get("labels") or {}).get("ray.io/accelerator-type"),
            min_workers=int(spec.get("min_workers", 0)), max_workers=int(spec.get("max_workers", 0))))
    return sorted(groups, key=lambda g: not g.head)


def cluster_file_image(path: Path) -> str | None:
    return ((read_yaml(path).get("docker") or {}).get("image")) if path.is_file() else None


def _quantity(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else str(n)


def pod_memory(cfg: KubernetesConfig, group: NodeGroup) -> tuple[int, int]:
    """(the container's memory in GiB, Ray's object store in bytes) for a node group."""
    gib = math.floor(group.memory / RAY_MEMORY_SHARE * cfg.node_memory_share / 2**30)
    store = gib * 2**30 - group.memory
    if store < 2**30:
        raise ConfigError(f"kubernetes.node_memory_share {cfg.node_memory_share}: a {group.name} pod of {gib} GiB "
                          f"leaves {store / 2**30:.1f} GiB beside Ray's memory ({group.memory / 2**30:.1f} GiB) "
                          "for the object store; raise it")
    return gib, store


def _container(cfg: KubernetesConfig, recipe: Any, group: NodeGroup) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": _quantity(group.cpus), "memory": f"{pod_memory(cfg, group)[0]}Gi"}
    if group.gpus:
        limits["nvidia.com/gpu"] = str(group.gpus)
    container: dict[str, Any] = {
        "name": "ray-head" if group.head else "ray-worker",
        "image": cfg.image,
        "resources": {"requests": dict(limits), "limits": limits},
        "env": [{"name": "RAY_AUTH_MODE", "value": recipe.ray.auth}],
    }
    if recipe.ray.auth == "token":  # every node of the cluster holds the same token
        container["env"].append({"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": cfg.token_secret, "key": "token"}}})
    auth = recipe.stage_config("serve").auth if "serve" in recipe.stage_configs else None
    if auth is not None and auth.enabled and auth.keys_file is None:  # the gateway's API keys
        container["env"].append({"name": auth.keys_env, "valueFrom": {"secretKeyRef": {
            "name": cfg.api_keys_secret, "key": "keys"}}})
    if group.head:
        container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"},
                              {"containerPort": 8000, "name": "serve"}]
    if cfg.runs_volume_claim:
        container["volumeMounts"] = [{"name": "runs", "mountPath": str(recipe.runs_dir)}]
    return container


def _pod_template(cfg: KubernetesConfig, recipe: Any, group: NodeGroup) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [_container(cfg, recipe, group)]}
    if cfg.runs_volume_claim:
        spec["volumes"] = [{"name": "runs", "persistentVolumeClaim": {"claimName": cfg.runs_volume_claim}}]
    if group.gpus and cfg.gpu_toleration:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "aerollms", "aerollms/node-type": group.name}},
            "spec": spec}


def _ray_start_params(cfg: KubernetesConfig, group: NodeGroup) -> dict[str, str]:
    params = {"memory": str(group.memory), "object-store-memory": str(pod_memory(cfg, group)[1])}
    if group.head:
        params["dashboard-host"] = "0.0.0.0"
    if group.accelerator:
        params["labels"] = f"ray.io/accelerator-type={group.accelerator}"
    return params


def ray_cluster_spec(cfg: KubernetesConfig, recipe: Any, groups: list[NodeGroup]) -> dict:
    """The RayCluster spec (also the RayJob's and RayService's cluster)."""
    import ray

    head = next(g for g in groups if g.head)
    spec: dict[str, Any] = {
        "rayVersion": ray.__version__,
        "headGroupSpec": {"serviceType": "ClusterIP", "rayStartParams": _ray_start_params(cfg, head),
                          "template": _pod_template(cfg, recipe, head)},
        "workerGroupSpecs": [
            {"groupName": g.name.replace("_", "-"), "replicas": g.min_workers, "minReplicas": g.min_workers,
             "maxReplicas": g.max_workers, "rayStartParams": _ray_start_params(cfg, g),
             "template": _pod_template(cfg, recipe, g)}
            for g in groups if not g.head],
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": cfg.idle_timeout_s},
    }
    return spec


def _metadata(cfg: KubernetesConfig, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": cfg.namespace, "labels": {"app.kubernetes.io/name": "aerollms"}}


def serve_config(recipe: Any, recipe_in_image: str) -> dict[str, Any]:
    """Ray Serve's deploy config for the recipe's serve stage: the app resolves its model paths
    from the run folder when it starts (`serve.app:recipe_app_builder`)."""
    serve = recipe.stage_config("serve")
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": serve.port},
            "applications": [{"name": serve.app_name, "route_prefix": serve.route_prefix,
                              "import_path": "serve.app:recipe_app_builder",
                              "args": {"recipe": recipe_in_image}}]}


def manifests(recipe: Any, recipe_path: str) -> dict[str, dict[str, Any]]:
    """{file name: manifest} for the recipe; `recipe_path` is the recipe's path inside the image."""
    if not recipe.kubernetes:
        raise UserError(f"{recipe.source or 'the recipe'} has no kubernetes: section (at least kubernetes.image)")
    cfg = validate_section(KubernetesConfig, recipe.kubernetes, source=str(recipe.source or "<recipe>"),
                           prefix="kubernetes")
    groups = node_groups(cfg.cluster_file)
    image = cluster_file_image(cfg.cluster_file)
    if image is not None and image != cfg.image:
        raise ConfigError(f"kubernetes.image {cfg.image!r} differs from {cfg.cluster_file}'s docker.image {image!r}: "
                          "the two describe the same machines")
    name = cfg.name or recipe.run.lower().replace("_", "-").replace(".", "-")
    if len(name) > 50 or not _DNS_LABEL.match(name):  # room for the -pipeline / -ray-token suffixes
        raise ConfigError(f"{name!r} (from the run's name) is not a Kubernetes name of at most 50 characters: "
                          "set kubernetes.name")
    cfg.token_secret = cfg.token_secret or f"{name}-ray-token"
    cfg.api_keys_secret = cfg.api_keys_secret or f"{name}-api-keys"
    cluster = ray_cluster_spec(cfg, recipe, groups)
    out = {
        "raycluster.yaml": {"apiVersion": KUBERAY_API, "kind": "RayCluster", "metadata": _metadata(cfg, name),
                            "spec": cluster},
        "rayjob.yaml": {"apiVersion": KUBERAY_API, "kind": "RayJob", "metadata": _metadata(cfg, f"{name}-pipeline"),
                        "spec": {"entrypoint": shlex.join(["aero", "pipeline", recipe_path, "--no-serve"]),
                                 "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": cfg.job_ttl_s,
                                 "rayClusterSpec": cluster}},
    }
    if "serve" in recipe.stages or "serve" in recipe.stage_configs:
        out["rayservice.yaml"] = {
            "apiVersion": KUBERAY_API, "kind": "RayService", "metadata": _metadata(cfg, f"{name}-serve"),
            "spec": {"serveConfigV2": yaml.safe_dump(serve_config(recipe, recipe_path), sort_keys=False),
                     "rayClusterConfig": cluster}}
    for file, manifest in out.items():
        check_manifest(file, manifest)
    return out


def pod_templates(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, template) for every pod template in a KubeRay manifest."""
    spec = manifest["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    found = [("headGroupSpec.template", cluster["headGroupSpec"]["template"])]
    found += [(f"workerGroupSpecs[{g['groupName']}].template", g["template"]) for g in cluster["workerGroupSpecs"]]
    return found


def check_manifest(file: str, manifest: dict[str, Any]) -> None:
    """Kubernetes' PodTemplate schema (strict) for each pod template; Ray Serve's schema for a
    RayService's Serve config. Raises UserError naming the file, the place and the field."""
    import kubernetes_validate
    from ray.serve.schema import ServeDeploySchema

    for where, template in pod_templates(manifest):
        resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
        try:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in list(exc.path)[1:])
            raise UserError(f"{file}: {where}.{path}: {exc.message}") from None
    if manifest["kind"] == "RayService":
        try:
            ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
        except Exception as exc:  # pydantic's ValidationError, as Ray's schema raises it
            raise UserError(f"{file}: spec.serveConfigV2: {' '.join(str(exc).split())[:400]}") from None


def recipe_in_image(recipe_file: Path) -> str:
    """The recipe's path in the image: a recipe inside this project is installed with it."""
    try:
        return str(Path(IMAGE_PROJECT) / recipe_file.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        raise UserError(f"{recipe_file} is outside this project folder, so the image does not hold it: give its "
                        "path in the image with --recipe-path") from None


class _Dumper(yaml.SafeDumper):
    """YAML with multi-line strings (the Serve config) as literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def write_manifests(recipe: Any, out_dir: Path, recipe_path: str | None = None) -> list[Path]:
    """Write the recipe's manifests to `out_dir`; returns the files written."""
    if recipe_path is None:
        if recipe.source is None:
            raise UserError("the recipe has no file: give its path in the image with --recipe-path")
        recipe_path = recipe_in_image(recipe.source)
    written = []
    for file, manifest in manifests(recipe, recipe_path).items():
        path = out_dir / file
        atomic_write_text(path, yaml.dump(manifest, Dumper=_Dumper, sort_keys=False))
        written.append(path)
    return written
