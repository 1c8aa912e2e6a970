"""Batch generation throughput: Ray Data LLM (vLLM: the `generate` stage's processor) vs a plain
loop over transformers `generate` in batches of 16, vs the per-request path through the served
endpoint (our gateway over Ray Serve LLM, 8 clients), on the same ~100M-parameter Llama and
the same 256 prompts x 64 new tokens (greedy, end of sequence ignored), in one run.

    .venv/bin/python bench/generate_bench.py [--tokenizer runs/tiny-cpu/tokenizer/tokenizer]

Every figure is end to end, as a user waits for it: model load and engine start included.
The last line is JSON; `ratio` = Ray Data LLM tok/s / the transformers loop's. The model is
random (the figure is speed, not quality); its tokenizer is the tiny run's, else one trained
here on the standard library's docs.
"""

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORDS = "list dict set tuple string file loop class module import function method value type error".split()


def make_model(folder: Path, tokenizer_dir: Path) -> Path:
    """A random ~100M Llama (hidden 768, 10 layers) with the given tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=10,
                      num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    return folder


def prompts(n: int) -> list[str]:
    return [f"Question {i}: what does the {WORDS[i % len(WORDS)]} {WORDS[(i * 7) % len(WORDS)]} do?" for i in range(n)]


def ray_data_llm(model: Path, texts: list[str], tokens: int) -> dict:
    """What the `generate` stage runs (its processor), with the engine on every core."""
    import os

    from jobs.vllm_batch import rows_dataset
    from serve.generate.generate_config import GenerateConfig
    from serve.generate.prompt_rows import ID
    from serve.generate.stage import build

    start = time.perf_counter()
    cfg = GenerateConfig(model=str(model), template="bench.j2", chat="off", batch_size=64, max_model_len=512,
                         kv_cache_gib=2, cpu_threads=f"0-{os.cpu_count() - 1}",
                         sampling={"max_tokens": tokens, "min_tokens": tokens, "temperature": 0.0})
    processor = build(cfg, model)
    todo = [{ID: str(i), "messages": [{"role": "user", "content": t}], "prompt": t} for i, t in enumerate(texts)]
    rows = processor(rows_dataset(todo, cfg.batch_size)).take_all()
    elapsed = time.perf_counter() - start
    assert not any(r["__inference_error__"] for r in rows), [r["__inference_error__"] for r in rows][:3]
    generated = sum(int(r["num_generated_tokens"]) for r in rows)
    return {"rows": len(rows), "seconds": elapsed, "rows_per_s": len(rows) / elapsed, "tok_per_s": generated / elapsed}


def transformers_loop(model_dir: Path, texts: list[str], tokens: int, batch: int = 16) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    generated = 0
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tok(texts[i:i + batch], return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            generated += (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
    elapsed = time.perf_counter() - start
    return {"rows": len(texts), "seconds": elapsed, "rows_per_s": len(texts) / elapsed, "tok_per_s": generated / elapsed}


def served(model: Path, texts: list[str], tokens: int, clients: int = 8) -> dict:
    import httpx

    from bench.serve_bench import free_port, wait_http
    from serve.app import deploy
    from serve.serve_config import ServeConfig

    start = time.perf_counter()
    limits = {"max_ongoing_requests": 64, "max_queued_requests": 64, "num_cpus": 0,
              "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    cfg = ServeConfig.model_validate({"app_name": "genbench", "port": free_port(), "auth": {"enabled": False},
                                      "moderation": {"enabled": False}, "ingress": limits, "pages": {"enabled": False},
                                      "models": [{"name": "m", "source": "x", "max_batch": 64, "deployment": limits}]})
    base = deploy(cfg, {"m": str(model)})
    wait_http(f"{base}/health")
    queue = list(texts)
    generated = 0

    async def worker(client):
        nonlocal generated
        while queue:
            prompt = queue.pop()
            r = await client.post(f"{base}/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": tokens,
                                                                   "min_tokens": tokens, "temperature": 0,
                                                                   "ignore_eos": True})
            r.raise_for_status()
            generated += r.json()["usage"]["completion_tokens"]

    async def run():
        async with httpx.AsyncClient(timeout=600) as client:
            await asyncio.gather(*(worker(client) for _ in range(clients)))

    asyncio.run(run())
    elapsed = time.perf_counter() - start
    from ray import serve

    serve.delete("genbench")
    return {"rows": len(texts), "seconds": elapsed, "rows_per_s": len(texts) / elapsed, "tok_per_s": generated / elapsed,
            "clients": clients}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, default=ROOT / "runs" / "tiny-cpu" / "tokenizer" / "tokenizer")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--paths", default="ray_data_llm,transformers_loop,served_endpoint", help="which to run")
    args = ap.parse_args()
    paths = args.paths.split(",")
    import ray

    texts = prompts(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "m100", args.tokenizer)
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        figures = {}
        for name, path in (("ray_data_llm", ray_data_llm), ("transformers_loop", transformers_loop),
                           ("served_endpoint", served)):
            if name in paths:
                figures[name] = path(model, texts, args.tokens)
                print(name, figures[name], flush=True)
        ray.shutdown()
    tok_s = {k: v["tok_per_s"] for k, v in figures.items()}
    print(json.dumps({"bench": "generate", "prompts": args.prompts, "tokens": args.tokens,
                      **{f"{k}_tok_s": round(v, 1) for k, v in tok_s.items()},
                      **{f"{k}_s": round(v["seconds"], 1) for k, v in figures.items()},
                      **({"ratio": round(tok_s["ray_data_llm"] / tok_s["transformers_loop"], 3)}
                         if {"ray_data_llm", "transformers_loop"} <= set(tok_s) else {}),
                      **({"ratio_vs_served": round(tok_s["ray_data_llm"] / tok_s["served_endpoint"], 3)}
                         if {"ray_data_llm", "served_endpoint"} <= set(tok_s) else {})}))


if __name__ == "__main__":
    main()
