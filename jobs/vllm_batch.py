"""Ray Data LLM's vLLM processor, set up one way for every batch job over a model of ours: the
`generate` stage (serve/generate/) and the `eval` stage's answers (jobs/evaluate.py).

The engine runs in one actor per replica with a CPU bundle (vLLM's CPU build) or a GPU
bundle; the row mapping around it runs as one small task at a time, since Ray Data's
default of a task per block, at a tenth of a CPU each, starts a worker process per block and
starves the engine's own start on a small machine.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from cluster.config import StrictModel
from cluster.errors import UserError
from jobs.awq_loader import awq_settings


# The cores vLLM's CPU build binds its threads to (VLLM_CPU_OMP_THREADS_BIND), for batch and
# served engines alike.
CpuThreads = Annotated[str, Field(
    pattern=r"^(auto|nobind|[0-9][0-9,\-]*)$",
    description="the cores vLLM's CPU build binds its threads to (VLLM_CPU_OMP_THREADS_BIND): auto = every core of "
                "the node but one, kept for its scheduler (engines that share a machine all take the same cores); "
                "nobind = the OS places the threads; ids such as 0-1 = those cores")]


class BatchEngine(StrictModel):
    """How the vLLM engine of a batch job runs."""

    batch_size: int = Field(default=16, ge=1, description="rows per batch sent to the engine (its max_num_seqs)")
    max_model_len: int | None = Field(default=None, ge=16)
    cpus: float = Field(default=1.0, gt=0, description="the engine's CPU bundle (CPU machines)")
    gpus: float = Field(default=0.0, ge=0, description="GPUs per engine replica (0: vLLM's CPU build)")
    kv_cache_gib: int = Field(default=1, ge=1, description="vLLM's KV cache on CPU (VLLM_CPU_KVCACHE_SPACE)")
    cpu_threads: CpuThreads = "auto"
    helper_cpus: float = Field(default=0.1, gt=0, description="CPUs of each light step around the engine (templating, "
                                                               "pre/post-processing); Ray Data LLM's default of 1 each "
                                                               "leaves a 2-CPU machine no room for the engine")
    concurrency: int = Field(default=1, ge=1, description="engine replicas")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="more vLLM engine arguments")


def context_length(path: str | Path) -> int:
    """The model's context: `max_position_embeddings` of its config.json."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a model folder (config.json: {exc})") from None
    return int(config.get("max_position_embeddings") or 2048)


def vllm_processor(engine: BatchEngine, model_dir: Path, *, chat: bool, preprocess: Callable[[dict], dict],
                   postprocess: Callable[[dict], dict], task: Literal["generate", "classify"] = "generate"):
    """`build_processor` over `model_dir`. `generate`: rows from `preprocess` carry `messages`
    (chat: the model's chat template is applied) or `prompt`, and `sampling_params`; an AWQ
    folder runs as 4-bit weights. `classify` (a sequence-classification model, e.g. a reward
    model): rows carry `tokenized_prompt` and `pooling_params`, and come back with the class
    scores in `embeddings`. A row the engine refuses (a prompt over the context) comes back
    with its `__inference_error__` instead of failing the job."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    light = {"num_cpus": engine.helper_cpus}
    gpu = engine.gpus > 0
    kwargs = {"max_model_len": min(engine.max_model_len or 10**9, context_length(model_dir)),
              "enforce_eager": not gpu, "max_num_seqs": engine.batch_size,
              **({"quantization": "awq"} if awq_settings(model_dir) else {}), **engine.engine_kwargs}
    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir), engine_kwargs=kwargs, batch_size=engine.batch_size, task_type=task,
        concurrency=engine.concurrency, should_continue_on_error=True, chat_template_stage={"enabled": chat, **light},
        # Separate tokenizing actors keep a GPU busy; on CPU they only take cores from the
        # engine, which tokenizes and detokenizes itself. Classification rows come tokenized.
        tokenize_stage={"enabled": gpu and task == "generate", **light},
        detokenize_stage={"enabled": gpu and task == "generate", **light},
        placement_group_config={"bundles": [{"GPU": engine.gpus, "CPU": engine.cpus} if gpu else {"CPU": engine.cpus}]},
        runtime_env=None if gpu else {"env_vars": {"VLLM_CPU_KVCACHE_SPACE": str(engine.kv_cache_gib),
                                                   "VLLM_CPU_OMP_THREADS_BIND": engine.cpu_threads}})
    mapping = map_kwargs(engine)
    return build_processor(config, preprocess=preprocess, postprocess=postprocess, preprocess_map_kwargs=mapping,
                           postprocess_map_kwargs=mapping)


def map_kwargs(engine: BatchEngine) -> dict[str, Any]:
    """The row mapping's resources around any processor (vLLM's or an HTTP one): a pool of
    `concurrency` small tasks."""
    from ray.data import TaskPoolStrategy

    return {"num_cpus": engine.helper_cpus, "compute": TaskPoolStrategy(size=engine.concurrency)}


def rows_dataset(rows: list[dict], batch_size: int):
    """Rows as a Ray Dataset of one block per engine batch (not Ray's default of one block per
    few rows: each block is a task)."""
    import ray

    return ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // batch_size)))
