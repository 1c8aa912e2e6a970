"""The recipe's model entries as Ray Serve LLM configs (no cluster): vLLM's engine arguments,
CPU or GPU placement, autoscaling, and the one-line refusal where vLLM cannot run."""

from __future__ import annotations

import json
import sys

import pytest

from cluster.errors import UserError
from serve.serve_config import ModelSpec, ServeConfig


def _model(tmp_path, name: str, quant: dict | None = None):
    folder = tmp_path / name
    folder.mkdir()
    cfg = {"model_type": "llama", "max_position_embeddings": 256}
    if quant:
        cfg["quantization_config"] = quant
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_a_cpu_model_gets_vllm_engine_arguments_bundles_and_autoscaling(tmp_path):
    from serve.llm_deployment import llm_config

    spec = ModelSpec.model_validate({
        "name": "m", "source": "sft", "max_batch": 4, "default_max_tokens": 32, "kv_cache_gib": 2,
        "sampling_defaults": {"frequency_penalty": 1.0}, "cpu_threads": "nobind",
        "deployment": {"num_cpus": 1, "max_ongoing_requests": 3, "resources": {"pool": 1},
                       "autoscaling": {"min_replicas": 1, "max_replicas": 2}}})
    cfg = llm_config(spec, _model(tmp_path, "fp"))
    e = cfg.engine_kwargs
    assert e["max_model_len"] == 256 and e["max_num_seqs"] == 4 and e["enforce_eager"] is True
    assert e["override_generation_config"] == {"frequency_penalty": 1.0}
    assert "quantization" not in e
    assert cfg.placement_group_config == {"bundles": [{"CPU": 1.0, "pool": 1}]}
    assert cfg.runtime_env == {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}}
    d = cfg.deployment_config
    assert d["autoscaling_config"]["max_replicas"] == 2 and d["max_ongoing_requests"] == 3
    assert cfg.model_id == "m"


def test_awq_folders_are_served_as_4_bit_and_gpu_models_get_gpu_bundles(tmp_path):
    from serve.llm_deployment import llm_config

    awq = _model(tmp_path, "awq", {"quant_method": "awq", "bits": 4, "group_size": 128})
    spec = ModelSpec.model_validate({"name": "q", "source": "quantize", "max_model_len": 128,
                                     "engine_kwargs": {"tensor_parallel_size": 1},
                                     "deployment": {"num_gpus": 1, "num_cpus": 2}})
    cfg = llm_config(spec, awq)
    assert cfg.engine_kwargs["quantization"] == "awq" and cfg.engine_kwargs["max_model_len"] == 128
    assert cfg.engine_kwargs["enforce_eager"] is False and cfg.engine_kwargs["tensor_parallel_size"] == 1
    assert cfg.placement_group_config == {"bundles": [{"GPU": 1.0, "CPU": 2.0}]} and cfg.runtime_env is None


def test_without_vllm_serving_says_why_in_one_line(tmp_path, monkeypatch):
    from serve.app import build_app
    from serve.llm_deployment import vllm_unavailable

    assert vllm_unavailable() is None  # this machine runs it
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if it were not installed
    why = vllm_unavailable()
    assert why is not None and "vLLM" in why and "\n" not in why
    cfg = ServeConfig.model_validate({"models": [{"name": "m", "source": "sft"}], "moderation": {"enabled": False},
                                      "auth": {"enabled": False}})
    with pytest.raises(UserError, match="serving needs vLLM"):
        build_app(cfg, {"m": _model(tmp_path, "m")}, [])
