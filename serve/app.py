"""Stage `serve` and `aero serve`: build the Ray Serve application from the recipe's `serve`
section, deploy it, and write a `serve deploy`-able config file for production clusters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import UserError
from cluster.manifest import atomic_write_text
from cluster.stage import Stage, StageContext, StageResult
from serve.serve_config import AuthConfig, ServeConfig


def api_keys(auth: AuthConfig) -> list[str]:
    """The keys in `keys_env` and `keys_file` (none when auth is off)."""
    if not auth.enabled:
        return []
    keys = [k for k in os.environ.get(auth.keys_env, "").split(",") if k.strip()]
    if auth.keys_file:
        path = Path(auth.keys_file).expanduser()
        if not path.is_file():
            raise UserError(f"serve.auth.keys_file: {path} does not exist")
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not keys:
        raise UserError(f"serve.auth is on but no API keys were found: set {auth.keys_env}=key1,key2 or "
                        f"serve.auth.keys_file (turn auth off only with serve.auth.enabled: false)")
    return keys


def api_key_digests(auth: AuthConfig) -> list[str]:
    """SHA-256 digests of the keys: the replicas never see a key."""
    from serve.gateway import key_digest

    return [key_digest(k) for k in api_keys(auth)]


def build_app(cfg: ServeConfig, paths: dict[str, str], digests: list[str]):
    """The Serve application: one Ray Serve LLM deployment (vLLM) per local model, the
    moderation and retriever deployments, the gateway in front. `paths` maps model names (and, with
    moderation on, `moderation:classifier`, `moderation:guard`, `moderation:audit`; with Q&A
    on, `qa:index`; with feedback on, `feedback:db`, a SQLAlchemy URL) to folders / files."""
    from ray import serve

    from serve.gateway import Gateway
    from serve.llm_deployment import llm_deployment, vllm_unavailable
    from serve.moderation.deployment import ModerationServer
    from serve.prompt_templates import load_template

    load_template(cfg.pages.chat_template, cfg.prompt_dirs)  # a bad template stops here, not in a replica
    if cfg.qa.index:
        load_template(cfg.qa.template, cfg.prompt_dirs, {"question", "passages"})

    def options(limits) -> dict[str, Any]:
        return {**limits.serve_options(), "ray_actor_options": {
            "num_cpus": limits.num_cpus, "num_gpus": limits.num_gpus, "resources": dict(limits.resources)}}

    local = [m for m in cfg.models if m.source]
    if local and (why := vllm_unavailable()):
        raise UserError(why)
    handles = {m.name: llm_deployment(m, paths[m.name]) for m in local}
    ingress_options = options(cfg.ingress)
    envs = {m.api_key_env: os.environ[m.api_key_env] for m in cfg.models if m.api_key_env and m.api_key_env in os.environ}
    if envs:  # upstream keys reach the gateway replicas as environment variables
        ingress_options["ray_actor_options"]["runtime_env"] = {"env_vars": envs}
    moderation = None
    if cfg.moderation.enabled:
        deployment = serve.deployment(ModerationServer, name="moderation", **options(cfg.moderation.deployment))
        moderation = deployment.bind(cfg.moderation.model_dump(mode="json"), paths[CLASSIFIER],
                                     paths.get(GUARD), paths.get(AUDIT))
    retriever = None
    if cfg.qa.index:
        from serve.qa.deployment import Retriever

        deployment = serve.deployment(Retriever, name="retriever", **options(cfg.qa.deployment))
        retriever = deployment.bind(paths[QA_INDEX])
    gateway = serve.deployment(Gateway, name="gateway", **ingress_options)
    return gateway.bind(cfg.model_dump(mode="json"), handles, digests, moderation, retriever,
                        paths.get(FEEDBACK) if cfg.feedback.enabled else None, {m.name: paths[m.name] for m in local})


def app_builder(args: dict[str, Any]):
    """`serve deploy serve_config.yaml` entry point (keys read from the cluster's environment)."""
    cfg = ServeConfig.model_validate(args["config"])
    return build_app(cfg, args["paths"], api_key_digests(cfg.auth))


def recipe_app_builder(args: dict[str, Any]):
    """Entry point of the RayService that `aero cluster k8s` writes: the recipe is read on the
    cluster, and the model paths come from its finished run (runs_dir on a shared volume)."""
    from cluster.config import load_recipe
    from cluster.runner import stage_context

    recipe = load_recipe(args["recipe"])
    cfg = recipe.stage_config("serve")
    return build_app(cfg, model_paths(stage_context(recipe, "serve"), cfg), api_key_digests(cfg.auth))


CLASSIFIER, GUARD, AUDIT = "moderation:classifier", "moderation:guard", "moderation:audit"
QA_INDEX, FEEDBACK = "qa:index", "feedback:db"


def model_paths(ctx: StageContext, cfg: ServeConfig) -> dict[str, str]:
    """Folders of the local models, the moderation classifier / guard model and the Q&A index,
    the audit log file and the feedback database (stage names resolve to their outputs in
    this run)."""
    from serve.feedback.store import sqlite_url

    paths = {m.name: str(ctx.model_dir(m.source).resolve()) for m in cfg.models if m.source}
    mod = cfg.moderation
    if mod.enabled:
        paths[CLASSIFIER] = str(ctx.resolve(mod.classifier, "classifier").resolve())
        if mod.guard_model:
            paths[GUARD] = str(ctx.model_dir(mod.guard_model).resolve())
        paths[AUDIT] = str(Path(mod.audit_log or ctx.stage_dir / "moderation_audit.jsonl").expanduser().resolve())
    if cfg.qa.index:
        paths[QA_INDEX] = str(ctx.resolve(cfg.qa.index, "index").resolve())
    if cfg.feedback.enabled:
        paths[FEEDBACK] = cfg.feedback.database or sqlite_url(ctx.stage_dir / "feedback.db")
    return paths


def deploy(cfg: ServeConfig, paths: dict[str, str]) -> str:
    """Deploy (or update) the app on the connected Ray; returns the base URL."""
    from ray import serve

    digests = api_key_digests(cfg.auth)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, paths, digests), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def serve_deploy_config(cfg: ServeConfig, paths: dict[str, str]) -> dict[str, Any]:
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": cfg.port},
            "applications": [{"name": cfg.app_name, "route_prefix": cfg.route_prefix,
                              "import_path": "serve.app:app_builder",
                              "args": {"config": cfg.model_dump(mode="json"), "paths": paths}}]}


def run(ctx: StageContext, cfg: ServeConfig) -> StageResult:
    paths = model_paths(ctx, cfg)
    url = deploy(cfg, paths)
    atomic_write_text(ctx.stage_dir / "serve_config.yaml", yaml.safe_dump(serve_deploy_config(cfg, paths), sort_keys=False))
    endpoint = {"url": url, "openai_base_url": f"{url}/v1", "models": [m.name for m in cfg.models], "paths": paths,
                "moderation": cfg.moderation.enabled, "audit_log": paths.get(AUDIT),
                "pages": {"chat": f"{url}/chat", "qa": f"{url}/qa"} if cfg.pages.enabled else None,
                "feedback_db": paths.get(FEEDBACK)}
    atomic_write_text(ctx.stage_dir / "endpoint.json", json.dumps(endpoint, indent=2) + "\n")
    print(f"aero: serving {', '.join(endpoint['models'])} at {url}/v1 (OpenAI-compatible)"
          + (f"; chat page {url}/chat, Q&A page {url}/qa" if cfg.pages.enabled else ""))
    outputs = {"endpoint": ctx.stage_dir / "endpoint.json", "serve_config": ctx.stage_dir / "serve_config.yaml"}
    metrics: dict[str, Any] = {}
    if cfg.check.enabled:
        metrics = _demo_check(ctx, cfg, url)
        outputs["check"] = ctx.stage_dir / "check.json"
    return StageResult(outputs=outputs, metrics=metrics)


def _demo_check(ctx: StageContext, cfg: ServeConfig, url: str) -> dict[str, Any]:
    """serve/demo_check.py through the live routes; check.json and the manifest's figures."""
    from serve.demo_check import load_qa_items, markdown, run_check, summary

    check = cfg.check
    model = check.model or cfg.models[0].name
    items: list[dict] = []
    if check.qa_items and cfg.qa.index:
        try:
            source = ctx.resolve(check.qa_items, "qa_val")
        except UserError as exc:  # e.g. serving model folders without the chat_data stage
            print(f"aero: serve: no Q&A check: {exc}")
        else:
            items = load_qa_items(source, check.max_qa_items)
    keys = api_keys(cfg.auth)
    result = run_check(url, keys[0] if keys else None, check, model, items, timeout_s=cfg.request_timeout_s)
    atomic_write_text(ctx.stage_dir / "check.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(ctx.stage_dir / "check.md", markdown(result))
    figures = summary(result)
    print("aero: serve check: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()))
    return figures


def _inputs(ctx: StageContext, cfg: ServeConfig) -> dict[str, str]:
    refs = [m.source for m in cfg.models if m.source]
    if cfg.moderation.enabled:
        refs += [cfg.moderation.classifier] + ([cfg.moderation.guard_model] if cfg.moderation.guard_model else [])
    if cfg.qa.index:
        refs.append(cfg.qa.index)
    return ctx.fingerprints(refs)


def status(recipe) -> str:
    """`aero serve CONFIG --status`: every Serve application on the recipe's cluster and its
    deployments' replica states."""
    from ray import serve

    from cluster.ray_session import connect_ray

    def plain(value) -> str:  # Ray's status enums print as `ApplicationStatus.RUNNING`
        return str(getattr(value, "value", value))

    connect_ray(recipe.ray)
    lines = []
    for name, app_status in serve.status().applications.items():
        lines.append(f"{name}: {plain(app_status.status)}")
        for dep, d in app_status.deployments.items():
            replicas = ", ".join(f"{n} {plain(state)}" for state, n in d.replica_states.items())
            lines.append(f"  {dep}: {plain(d.status)} (replicas: {replicas or 'none'})")
    return "\n".join(lines) or "serve: no applications"


def shutdown(recipe) -> str:
    """`aero serve CONFIG --shutdown`: stop every Serve application on the recipe's cluster."""
    from ray import serve

    from cluster.ray_session import connect_ray

    connect_ray(recipe.ray)
    serve.shutdown()
    return "serve: shut down"


def memory_needs(recipe, cfg: ServeConfig) -> list:
    """The planner's figure per LLM replica (cluster/plan.py): fp32 weights on CPU (bf16 on
    GPU) and the KV cache: vLLM's reserved space on CPU, `max_batch` sequences at the model's
    full context on GPU."""
    from cluster.plan import WorkerNeed
    from jobs.memory_estimate import CUDA_CONTEXT_BYTES, WORKER_RUNTIME_BYTES, kv_cache_bytes, model_shape_for

    needs = []
    for spec in cfg.models:
        shape = model_shape_for(recipe, spec.source) if spec.source else None
        if shape is None:
            continue
        gpu = spec.deployment.num_gpus > 0
        parts = {"runtime": WORKER_RUNTIME_BYTES, "weights": shape.params * (2 if gpu else 4),
                 # vLLM on CPU reserves VLLM_CPU_KVCACHE_SPACE whole; on GPU, the cache of max_batch sequences
                 "kv_cache": kv_cache_bytes(shape, sequences=spec.max_batch, context=shape.context, gpu=True)
                 if gpu else spec.kv_cache_gib * 2**30}
        replicas = max(spec.deployment.autoscaling.max_replicas, 1)
        device = parts["weights"] + parts["kv_cache"] + CUDA_CONTEXT_BYTES if gpu else 0
        needs.append(WorkerNeed("serve", f"LLM replica {spec.name!r}", replicas,
                                WORKER_RUNTIME_BYTES if gpu else sum(parts.values()), device,
                                gpus_per_worker=spec.deployment.num_gpus, cpus_per_worker=spec.deployment.num_cpus,
                                parts=parts, note=f"max_batch {spec.max_batch} x context {shape.context}"))
    return needs


STAGE = Stage(name="serve", config_model=ServeConfig, run=run, outside_inputs=_inputs, always_run=True,
              memory=memory_needs,
              description="Ray Serve: OpenAI-compatible gateway over the recipe's models")
