"""The serving tests' shared app: deployed once for this package (Serve and page tests) and
shut down after it, so its replicas never hold the CPUs that the training tests need."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, recipe

KEY = "test-key-1"
CHECK_QUESTIONS = ["What does the for statement do?", "Explain the list type.", "What is a dict?"]
LIGHT = {"num_cpus": 0, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
LLM = {**LIGHT, "num_cpus": 0.1}  # a placement bundle of a tenth of a CPU: three fit beside the training tests' 2
# The Q&A test collection: a tiny folder of documents on unrelated topics.
QA_DOCS = {
    "zebras.md": "# Zebra care\n\nZebras graze on grasses for most of the day and drink water every morning. "
                 "Their stripes confuse biting flies.\n\nA zebra herd is led by a stallion.\n",
    "kettles.txt": "Descaling a kettle\n\nFill the kettle with equal parts white vinegar and water, boil it, and "
                   "leave it for an hour to dissolve limescale. Rinse twice before making tea.\n",
    "orbits.rst": "Orbital periods\n===============\n\nA satellite in low Earth orbit circles the planet about every "
                  "90 minutes; a geostationary one takes a sidereal day.\n",
}


@pytest.fixture(scope="package")
def gateway(post_run, tmp_path_factory):
    """The `serve` stage of the trained run (with Q&A over a tiny folder and the feedback
    database, plus a model whose words are known: "lister" says " list" or " set", at random, until max_tokens,
    and a remote upstream that is this app's own /v1), and a second app whose output policy blocks everything."""
    from ray import serve

    from cluster.runner import run_stage
    from serve.app import build_app
    from serve.moderation.moderation_config import OPENAI_CATEGORIES
    from serve.serve_config import ServeConfig

    said = _words_model(post_run / "sft" / "model", tmp_path_factory.mktemp("words"), (" list", " set"))
    port = free_port()
    os.environ["AERO_API_KEYS"] = f"{KEY},other-key"
    os.environ["AERO_TEST_UPSTREAM_KEY"] = KEY  # the "remote" upstream is this app's own /v1
    base = f"http://127.0.0.1:{port}"
    # The test models are barely trained and emit fragments ("s.", "thes thes.") that the classifier may
    # misread; here outputs are only logged, and the strict app below checks output blocking on a model
    # whose output is known. Three vLLM engines: each costs ~1 GB and a start of ~1 min on 2 cores.
    section = {
        "port": port, "ingress": {**LIGHT, "max_ongoing_requests": 64, "max_queued_requests": 64},
        "moderation": {"policy": {c: {"output": "log"} for c in OPENAI_CATEGORIES}, "deployment": LIGHT},
        "models": [
            # Compact JSON under a schema: a small model left free pads it with whitespace to max_tokens.
            {"name": "sft", "source": "sft", "deployment": LLM,
             "engine_kwargs": {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
                               "enable_log_requests": True}},
            # Tight limits: one sequence at a time, one waiting at the replica, six at the gateway.
            {"name": "awq", "source": "quantize", "max_batch": 1, "max_concurrent": 6,
             "deployment": {**LLM, "max_ongoing_requests": 1, "max_queued_requests": 1}},
            {"name": "remote", "upstream": f"{base}/v1", "upstream_model": "sft",
             "api_key_env": "AERO_TEST_UPSTREAM_KEY"},
            # Long answers (1,024-token context) sent in many messages: a page test sees a stream
            # of several pieces even after output moderation's windows. A default frequency
            # penalty: greedy alternates its two words unless a request sets its own.
            {"name": "lister", "source": str(said), "default_max_tokens": 600, "stream_interval_ms": 20,
             "sampling_defaults": {"frequency_penalty": 1.0},
             "engine_kwargs": {"enable_log_requests": True}, "deployment": LLM},
        ],
        # The stage's check of what users see, kept short: three questions, four held-out Q&A items.
        "check": {"questions": CHECK_QUESTIONS, "max_tokens": 16, "max_qa_items": 4},
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
    # A second app whose output policy flags any text with words (threshold ~0), in front of the
    # first app's "lister" (always " list" or " set") as its upstream: every answer is blocked.
    strict = ServeConfig.model_validate({
        "app_name": "strict", "port": port, "route_prefix": "/strict", "ingress": LIGHT, "auth": {"enabled": False},
        "models": [{"name": "sft", "upstream": f"{base}/v1", "upstream_model": "lister",
                    "api_key_env": "AERO_TEST_UPSTREAM_KEY"}],
        "moderation": {"deployment": LIGHT, "policy": {"violence": {"input": "log", "output": "block", "threshold": 1e-9}}}})
    serve.run(build_app(strict, {"moderation:classifier": str(post_run / "moderation" / "classifier")}, []),
              name="strict", route_prefix="/strict", blocking=False)
    _wait_ready(base)
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"  # the session's cluster (aero cluster up)
    yield {"base": base, "manifest": manifest, "stage": post_run / "serve", "docs": docs, "ray_logs": logs,
           "model_dir": post_run / "sft" / "model", "lm_eval_tasks": post_run / "eval" / "lm_eval"}
    serve.shutdown()


def vllm_log_count(gateway, model: str, phrase: str) -> int:
    """How often `phrase` appears in the log of `model`'s vLLM replica (`enable_log_requests`:
    "Added request", "Aborted request"): Ray writes each worker's output to its own file."""
    count = 0
    for f in list(gateway["ray_logs"].glob("worker-*.out")) + list(gateway["ray_logs"].glob("worker-*.err")):
        text = f.read_text(errors="replace")
        if f"served_model_name={model}," in text:
            count += text.count(phrase)
    return count


def _words_model(src, dst, words: tuple[str, ...]):
    """A Llama model with `src`'s tokenizer and a 1,024-token context that answers every prompt with
    `words`, each token drawn from them with equal odds: embeddings of ones, attention and MLP
    outputs zeroed, and an output head that reads only the words' tokens."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(src)
    tokens = [t for w in words for t in tok.encode(w, add_special_tokens=False)]
    assert len(tokens) == len(words), f"each of {words} must be one token"
    cfg = AutoConfig.from_pretrained(src)
    cfg.tie_word_embeddings, cfg.max_position_embeddings = False, 1024
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[tokens] = 1.0
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def _wait_ready(base: str, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ok = httpx.post(f"{base}/v1/completions", json={"model": "sft", "prompt": "a", "max_tokens": 1},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
            if ok and httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError("the Serve apps did not come up")
