"""The serving tests' shared app: deployed once for this package (Serve and page tests) and
shut down after it, so its replicas never hold the CPUs that the training tests need."""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import free_port, recipe

KEY, UPSTREAM_KEY = "test-key-1", "upstream-key"
CHECK_QUESTIONS = ["What does the for statement do?", "Explain the list type.", "What is a dict?"]
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


@pytest.fixture(scope="package")
def gateway(post_run, tmp_path_factory):
    """The `serve` stage of the trained run (with Q&A over a tiny folder and the feedback
    database, plus a model whose words are known: "lister" says " list" or " set", at random, until max_tokens),
    a second app that plays a remote upstream, and a third whose output policy blocks everything."""
    from ray import serve

    from cluster.runner import run_stage
    from serve.app import build_app
    from serve.gateway import key_digest
    from serve.moderation.moderation_config import OPENAI_CATEGORIES
    from serve.serve_config import ServeConfig

    said = _words_model(post_run / "sft" / "model", tmp_path_factory.mktemp("words"), (" list", " set"))
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
            {"name": "awq", "source": "quantize", "torch_threads": 2, "deployment": LIGHT},
            {"name": "tight", "source": "sft", "max_batch": 1, "max_concurrent": 6,
             "deployment": {**LIGHT, "max_ongoing_requests": 1, "max_queued_requests": 1}},
            {"name": "remote", "upstream": f"{base}/upstream/v1", "upstream_model": "up-sft",
             "api_key_env": "AERO_TEST_UPSTREAM_KEY"},
            # Long answers (1,024-token context) sent in many messages: a page test sees a stream
            # of several pieces even after output moderation's windows.
            {"name": "lister", "source": str(said), "default_max_tokens": 600, "stream_interval_ms": 20,
             "deployment": LIGHT},
            # The same words with a default frequency penalty: greedy alternates them.
            {"name": "lister-fp", "source": str(said), "sampling_defaults": {"frequency_penalty": 1.0},
             "deployment": LIGHT},
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
    serve.run(build_app(strict, {"sft": str(said),
                                 "moderation:classifier": str(post_run / "moderation" / "classifier")}, []),
              name="strict", route_prefix="/strict", blocking=False)
    _wait_ready(base)
    yield {"base": base, "manifest": manifest, "stage": post_run / "serve", "docs": docs}
    serve.shutdown()


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
