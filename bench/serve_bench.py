"""Serving throughput and latency: our gateway in front of the Ray Serve LLM deployment (vLLM on
this CPU) vs (a) the same model served one request at a time with plain transformers
`generate`, and (b) `transformers serve`, in the same run.

One async client streams `/v1/completions` (same prompts, max_tokens, greedy) at concurrency
1, 4, 8, 16 and measures time to first token (p50/p99), inter-token latency and output
tokens/s. All servers run at once and each level is measured on each in turn (the top level
`--rounds` times): this VM's speed drifts within minutes, so only measurements taken together
are compared. Tokens are counted from each stream's usage chunk (`stream_options.include_usage`;
peer (a) sends one too), not from the number of text chunks: a chunk may carry several tokens
(peer (a)'s streamer sends whole words; Ray Serve LLM batches a stream's tokens per interval). A server that
sends no usage is counted by chunks, and the row says `tokens_from_usage: false`. Then 2x
overload for `--overload-s` seconds against our gateway: every answer must be 200, 429 or 503
(no hangs) and the LLM replica's memory must stay flat.

    .venv/bin/python bench/serve_bench.py --model runs/tiny-cpu/sft/model

The last line is JSON: `ratio` = the median over rounds of our output tokens/s at concurrency 16
/ peer (a)'s in the same round.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPTS = ["The list type", "A dictionary maps", "To open a file", "The for statement", "Exceptions are",
           "A class defines", "The import system", "Strings in Python"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------- peer (a): one request at a time, plain generate, streamed ----------
def peer_generate_server(model_dir: str, port: int) -> None:
    import threading

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import StreamingResponse
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    app, lock = FastAPI(), asyncio.Lock()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()

        async def gen():
            async with lock:  # one request at a time
                ids = tok(body["prompt"], return_tensors="pt")
                streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
                n = body.get("max_tokens", 16)
                kw = dict(**ids, max_new_tokens=n, min_new_tokens=body.get("min_tokens", 0), do_sample=False,
                          streamer=streamer, pad_token_id=tok.pad_token_id)
                out: dict = {}
                thread = threading.Thread(target=lambda: out.setdefault("ids", model.generate(**kw)))
                thread.start()
                pieces = iter(streamer)
                while (text := await asyncio.to_thread(next, pieces, None)) is not None:
                    if text:
                        yield "data: " + json.dumps({"choices": [{"text": text, "index": 0}]}) + "\n\n"
                thread.join()
                generated = out["ids"].shape[1] - ids["input_ids"].shape[1]
                yield "data: " + json.dumps({"choices": [], "usage": {"completion_tokens": generated}}) + "\n\n"
                yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---------- the client ----------
async def one(client, url: str, prompt: str, max_tokens: int, headers: dict, model: str) -> dict:
    start = time.perf_counter()
    stamps: list[float] = []
    counted = None  # tokens from the usage chunk: a text chunk may carry several tokens
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    if not model.startswith("/"):  # ours and peer (a) take vLLM's min_tokens; transformers serve refuses it
        body["min_tokens"] = max_tokens
    async with client.stream("POST", url, json=body, headers=headers) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "tokens": 0}
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
                if chunk.get("usage"):
                    counted = chunk["usage"]["completion_tokens"]
    if not stamps:
        return {"status": 200, "tokens": 0}
    tokens = counted if counted is not None else len(stamps)
    return {"status": 200, "tokens": tokens, "counted": counted is not None, "ttft": stamps[0] - start,
            "itl": (stamps[-1] - stamps[0]) / max(tokens - 1, 1), "end": stamps[-1]}


async def load(url: str, concurrency: int, requests: int, max_tokens: int, headers: dict, model: str) -> dict:
    import httpx

    queue = list(range(requests))
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=300) as client:
        async def worker():
            while queue:
                i = queue.pop()
                results.append(await one(client, url, PROMPTS[i % len(PROMPTS)], max_tokens, headers, model))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200 and r["tokens"]]
    ttft = sorted(r["ttft"] for r in ok)

    def pct(p):
        return ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else float("nan")

    return {"concurrency": concurrency, "requests": requests, "ok": len(ok),
            "tokens_from_usage": all(r.get("counted") for r in ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct(0.5), "ttft_p99": pct(0.99),
            "itl_ms": 1000 * statistics.mean(r["itl"] for r in ok) if ok else float("nan")}


async def overload(url: str, concurrency: int, seconds: float, headers: dict, model: str) -> dict:
    import httpx

    statuses: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60) as client:
        async def worker(k):
            while time.monotonic() < deadline:
                try:
                    r = await one(client, url, PROMPTS[k % len(PROMPTS)], 32, headers, model)
                    key = str(r["status"])
                except httpx.TimeoutException:
                    key = "timeout"
                statuses[key] = statuses.get(key, 0) + 1
                if key != "200":
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return statuses


def replica_rss_mb() -> float:
    """Resident memory of the LLM replica: its Serve actor and vLLM's engine-core process."""
    import psutil

    total = 0
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:bench:llm-m" in cmd or "EngineCore" in cmd:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
    return total / 1e6


def wait_http(url: str, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--overload-s", type=float, default=30)
    ap.add_argument("--requests-per-client", type=int, default=8,
                    help="requests each concurrent client sends per level: enough that the ramp-up and the "
                         "last stragglers are a small part of the measured time (2 per client measured <1 s)")
    ap.add_argument("--stream-interval-ms", type=float, default=None,
                    help="our replica's stream interval with a full batch (default: the serve config's)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements of every server at the top concurrency")
    ap.add_argument("--peer-server", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = str(args.model.resolve())
    if args.peer_server:
        return peer_generate_server(model_dir, args.peer_server)

    import ray

    from serve.app import deploy
    from serve.serve_config import ServeConfig

    figures: dict[str, dict] = {}
    limits = {"max_ongoing_requests": 16, "max_queued_requests": 16, "num_cpus": 0,
              "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    # The serving path alone, as the peers have it: no moderation deployment (bench/moderation_bench.py
    # measures that one).
    cfg = ServeConfig.model_validate({"app_name": "bench", "port": free_port(), "auth": {"enabled": False},
                                      "moderation": {"enabled": False},
                                      "ingress": {**limits, "max_ongoing_requests": 256, "max_queued_requests": 64},
                                      "models": [{"name": "m", "source": "x", "max_batch": 16, "max_concurrent": 32,
                                                  "deployment": limits,
                                                  **({"stream_interval_ms": args.stream_interval_ms}
                                                     if args.stream_interval_ms is not None else {})}]})
    base = deploy(cfg, {"m": model_dir})
    wait_http(f"{base}/health")
    asyncio.run(load(f"{base}/v1/completions", 2, 4, 8, {}, "m"))  # warm-up
    servers = {"ours": (f"{base}/v1/completions", "m")}
    procs = []
    peers = {
        "peer_generate": [sys.executable, __file__, "--model", model_dir, "--peer-server", "{port}"],
        "transformers_serve": [str(Path(sys.executable).parent / "transformers"), "serve", model_dir,
                               "--port", "{port}", "--host", "127.0.0.1"],
    }
    for name, cmd in peers.items():  # all servers up at once; an idle one costs next to no CPU
        port = free_port()
        proc = subprocess.Popen([a.replace("{port}", str(port)) for a in cmd], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        try:
            wait_http(f"http://127.0.0.1:{port}/v1/models" if name != "peer_generate" else f"http://127.0.0.1:{port}/docs")
            servers[name] = (f"http://127.0.0.1:{port}/v1/completions", "peer" if name == "peer_generate" else model_dir)
            asyncio.run(load(servers[name][0], 1, 2, 8, {}, servers[name][1]))  # warm-up
        except Exception as exc:  # a peer that does not run here is reported, not fatal
            print(f"{name}: did not run ({exc}); stderr: {proc.stderr.read()[-500:] if proc.poll() is not None else ''}")
            proc.kill()
    # Each level is measured on every server back to back, `--rounds` times at the top level:
    # this VM's speed drifts by tens of percent within minutes, so a ratio is only fair between
    # measurements taken together. The ratio reported is the median of the per-round ratios.
    rows: dict[str, dict] = {name: {} for name in servers}
    top = max(args.levels)
    rounds: dict[str, list[float]] = {name: [] for name in servers if name != "ours"}
    for c in args.levels:
        for r in range(args.rounds if c == top else 1):
            measured = {}
            for name, (url, model) in servers.items():
                measured[name] = asyncio.run(load(url, c, args.requests_per_client * c, args.max_tokens, {}, model))
                print(name, measured[name], flush=True)
            if c == top:
                for name in rounds:
                    rounds[name].append(measured["ours"]["tokens_per_s"] / measured[name]["tokens_per_s"])
                print(f"round {r + 1} at concurrency {c}: ours / peer =",
                      {name: round(v[-1], 3) for name, v in rounds.items()}, flush=True)
            if r == 0:
                for name in servers:
                    rows[name][c] = measured[name]
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    rss0 = replica_rss_mb()
    statuses = asyncio.run(overload(f"{base}/v1/completions", 64, args.overload_s, {}, "m"))
    rss1 = replica_rss_mb()
    print(f"overload 64 concurrent x {args.overload_s:.0f}s: {statuses}; LLM replica RSS {rss0:.0f} -> {rss1:.0f} MB")
    figures["overload"] = {"statuses": statuses, "rss_before_mb": rss0, "rss_after_mb": rss1}
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    mid = 8 if 8 in rows["ours"] else top

    def median(name: str) -> float | None:
        return round(statistics.median(rounds[name]), 3) if rounds.get(name) else None

    print(json.dumps({"bench": "serve", "rounds": args.rounds, "stream_interval_ms": cfg.models[0].stream_interval_ms,
                      "ours_tok_s": round(rows["ours"][top]["tokens_per_s"], 1),
                      **{f"{name}_tok_s": round(rows[name][top]["tokens_per_s"], 1) for name in rounds},
                      "ratio": median("peer_generate"), "ratio_transformers_serve": median("transformers_serve"),
                      "ratios_per_round": {name: [round(v, 3) for v in vals] for name, vals in rounds.items()},
                      "ttft_p99_c8_s": round(rows["ours"][mid]["ttft_p99"], 3),
                      "overload": figures["overload"]}))


if __name__ == "__main__":
    main()
