"""One real Ray cluster per test session, started the way users start one: `aero cluster up`.

Tests that run stages in-process join it through RAY_ADDRESS; job-submission tests reach
its dashboard. It is stopped with `aero cluster down` at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
AERO = [sys.executable, "-m", "cluster.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def aero(*args: str, cwd: Path = REPO, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `aero` CLI in a subprocess."""
    return subprocess.run(
        [*AERO, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="session")
def ray_cluster():
    sessions = Path(tempfile.gettempdir()) / "ray"
    before = set(sessions.glob("session_2*"))
    port, dashboard_port = free_port(), free_port()
    os.environ["RAY_AUTH_MODE"] = "token"
    up = aero("cluster", "up", f"--port={port}", f"--dashboard-port={dashboard_port}", "--num-cpus=2")
    assert up.returncode == 0, up.stderr + up.stdout
    address = f"127.0.0.1:{port}"
    os.environ["RAY_ADDRESS"] = address
    yield {"address": address, "dashboard": f"http://127.0.0.1:{dashboard_port}"}
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    aero("cluster", "down")
    # The job-submission tests pip-install the project into job environments (~3 GB per
    # session); left behind, a few sessions fill the disk. Logs stay for debugging.
    for session in set(sessions.glob("session_2*")) - before:
        shutil.rmtree(session / "runtime_resources", ignore_errors=True)


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A few good documents, one Vietnamese, one code file, one JSON-lines file."""
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "vi.md").write_text("Tiếng Việt có dấu: sắc, huyền, hỏi, ngã, nặng.\n", encoding="utf-8")
    (root / "note.txt").write_text("Ray Data streams blocks through map_batches.\r\n\r\n\r\n\r\nEnd.  \n")
    (root / "tool.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "records.jsonl").write_text('{"id": "r1", "text": "first record"}\n{"id": "r2", "text": "second record"}\n')
    return root


# Quality filters off: tests of the runner use documents too short to pass as good prose.
LENIENT_QUALITY = """  quality:
    gopher_quality: {enabled: false}
    gopher_repetition: {enabled: false}
    c4: {enabled: false}
    language: {enabled: false}
"""


def write_recipe(path: Path, *, run: str, runs_dir: Path, sources: list[str], extra: str = "") -> Path:
    lines = [f"run: {run}", f"runs_dir: {runs_dir}", "stages: [data]", "data:", "  sources:"]
    lines += [f"    - '{s}'" for s in sources]
    path.write_text("\n".join(lines) + "\n" + LENIENT_QUALITY + extra)
    return path


# The trained run that the post-training and compression tests share: every stage once.
CALIBRATION = {"calib_sequences": 8, "eval_sequences": 8, "min_calib_tokens": 512}
COMPRESS = {"model": "pretrain", "calibration": CALIBRATION, "gen_tokens": 8, "gen_prompts": 1, "cpus": 1}
BASE = {
    "data": {"sources": ["stdlib:docs", "stdlib:code/json/*.py"], "val_fraction": 0.25,
             **yaml.safe_load("data:\n" + LENIENT_QUALITY)["data"]},
    "tokenizer": {"vocab_size": 1024, "seq_len": 128},
    "pretrain": {"steps": 40, "global_batch": 8, "micro_batch": 4, "warmup_steps": 4, "lr": 3e-3,
                 "checkpoint_every": 40, "eval_every": 40, "scaling": {"num_workers": 2}},
    "chat_data": {"max_answer_chars": 240, "pairs_per_document": 6},
    "sft": {"steps": 24, "per_device_batch": 4, "lr": 1e-3, "checkpoint_every": 12},
    "reward": {"steps": 40, "per_device_batch": 4, "lr": 1e-3, "checkpoint_every": 40},
    "dpo": {"steps": 16, "per_device_batch": 4, "lr": 5e-4, "checkpoint_every": 16},
    "grpo": {"steps": 4, "per_device_batch": 4, "num_generations": 4, "max_completion_length": 16,
             "checkpoint_every": 4, "rule_rewards": {"no_repetition": 0.5}, "lora": {"enabled": True, "r": 4}},
    "eval": {"records": 24, "prompts": 8, "max_new_tokens": 16, "ppl_sequences": 16},
    "sparsify": COMPRESS,
    "quantize": {**COMPRESS, "group_sizes": [128, 32]},
}
CHAIN = ["data", "tokenizer", "pretrain", "chat_data", "sft", "reward", "dpo", "grpo", "eval", "sparsify", "quantize",
         "moderation", "qa_index"]


def recipe(runs: Path, run: str = "post", **sections):
    from cluster.config import build_recipe

    return build_recipe({"run": run, "runs_dir": str(runs), "stages": CHAIN, **BASE, **sections})


@pytest.fixture(scope="session")
def post_run(ray_cluster, tmp_path_factory):
    """The whole chain once per test session; the tests read what it wrote."""
    from cluster.runner import run_stage

    runs = tmp_path_factory.mktemp("post_runs")
    r = recipe(runs)
    for stage in CHAIN:
        run_stage(r, stage)
    return runs / "post"


KEY, UPSTREAM_KEY = "test-key-1", "upstream-key"
LIGHT = {"num_cpus": 0, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
# The Q&A test collection: a tiny folder of documents on unrelated topics.
QA_DOCS = {
    "zebras.md": "# Zebra care\n\nZebras graze on grasses for most of the day and drink water every morning. "
                 "Their stripes confuse biting flies.\n\nA zebra herd is led by a stallion.\n",
    "kettles.txt": "Descaling a kettle\n\nFill the kettle with equal parts white vinegar and water, boil it, and "
                   "leave it for an hour to dissolve limescale. Rinse twice before making tea.\n",
    "orbits.rst": "Orbital periods\n===============\n\nA satellite in low Earth orbit circles the planet about every "
                  "90 minutes; a geostationary one takes a sidereal day.\n",
}


@pytest.fixture(scope="module")
def gateway(post_run, tmp_path_factory):
    """The `serve` stage of the trained run (with Q&A over a tiny folder and the feedback
    database), a second app that plays a remote upstream, and a third whose output policy
    blocks everything. Module-scoped: Serve is shut down after each module that uses it, so its
    replicas never hold the CPUs that later training tests need."""
    from ray import serve

    from cluster.runner import run_stage
    from serve.app import build_app
    from serve.gateway import key_digest
    from serve.moderation.moderation_config import OPENAI_CATEGORIES
    from serve.serve_config import ServeConfig

    port = free_port()
    os.environ["AERO_API_KEYS"] = f"{KEY},other-key"
    os.environ["AERO_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    base = f"http://127.0.0.1:{port}"
    # The test models are barely trained and emit fragments ("s.", "thes thes.") that the classifier may
    # misread; here outputs are only logged, and the strict app below checks output blocking on a model
    # whose output is known.
    section = {
        "port": port, "ingress": {**LIGHT, "max_ongoing_requests": 64, "max_queued_requests": 64},
        "moderation": {"policy": {c: {"output": "log"} for c in OPENAI_CATEGORIES}, "deployment": LIGHT},
        "models": [
            {"name": "sft", "source": "sft", "deployment": LIGHT},
            {"name": "awq", "source": "quantize", "deployment": LIGHT},
            {"name": "tight", "source": "sft", "max_batch": 1, "max_concurrent": 6,
             "deployment": {**LIGHT, "max_ongoing_requests": 1, "max_queued_requests": 1}},
            {"name": "remote", "upstream": f"{base}/upstream/v1", "upstream_model": "up-sft",
             "api_key_env": "AERO_TEST_UPSTREAM_KEY"},
        ],
    }
    docs = tmp_path_factory.mktemp("qa-docs")
    for name, text in QA_DOCS.items():
        (docs / name).write_text(text)
    index = run_stage(recipe(post_run.parent, "qa-folder", stages=["qa_index"], qa_index={"source": str(docs)}),
                      "qa_index")
    # The test models' context is 128 tokens: a template of our own with a short system prompt
    # (also checks that `prompt_dirs` templates are found).
    prompts = tmp_path_factory.mktemp("prompts")
    (prompts / "qa-short.v1.yaml").write_text("name: qa-short\nversion: 1\nsystem: Answer from the passages.\n"
                                              "user: \"{passages}\\nQ: {question}\"\n")
    section["prompt_dirs"] = [str(prompts)]
    section["qa"] = {"index": index.outputs["index"].path, "model": "sft", "max_tokens": 16, "template": "qa-short.v1",
                     "deployment": LIGHT}
    manifest = run_stage(recipe(post_run.parent, "post", serve=section), "serve")
    upstream = ServeConfig.model_validate({"app_name": "upstream", "port": port, "route_prefix": "/upstream",
                                           "ingress": LIGHT, "moderation": {"enabled": False},
                                           "models": [{"name": "up-sft", "source": "x", "deployment": LIGHT}]})
    serve.run(build_app(upstream, {"up-sft": str(post_run / "sft" / "model")}, [key_digest(UPSTREAM_KEY)]),
              name="upstream", route_prefix="/upstream", blocking=False)
    # A third app whose output policy flags any text with words (threshold ~0), serving a model that
    # always says " list": every answer is blocked.
    strict = ServeConfig.model_validate({
        "app_name": "strict", "port": port, "route_prefix": "/strict", "ingress": LIGHT, "auth": {"enabled": False},
        "models": [{"name": "sft", "source": "x", "deployment": LIGHT}],
        "moderation": {"deployment": LIGHT, "policy": {"violence": {"input": "log", "output": "block", "threshold": 1e-9}}}})
    said = _one_word_model(post_run / "sft" / "model", tmp_path_factory.mktemp("one-word"), " list")
    serve.run(build_app(strict, {"sft": str(said),
                                 "moderation:classifier": str(post_run / "moderation" / "classifier")}, []),
              name="strict", route_prefix="/strict", blocking=False)
    _wait_ready(base)
    yield {"base": base, "manifest": manifest, "stage": post_run / "serve", "docs": docs}
    serve.shutdown()


def _one_word_model(src, dst, word: str):
    """A Llama model with `src`'s tokenizer that answers every prompt with `word` repeated: embeddings
    of ones, attention and MLP outputs zeroed, and an output head that reads only `word`'s token."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    (token,) = tok.encode(word, add_special_tokens=False)
    cfg = AutoConfig.from_pretrained(src)
    cfg.tie_word_embeddings = False
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[token] = 1.0
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def _wait_ready(base: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ok = httpx.post(f"{base}/upstream/v1/completions", json={"model": "up-sft", "prompt": "a", "max_tokens": 1},
                            headers={"Authorization": f"Bearer {UPSTREAM_KEY}"}, timeout=10).status_code == 200
            if ok and httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the Serve apps did not come up")
