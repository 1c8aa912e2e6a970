"""The LLM deployment: one model (fp or AWQ folder) per replica, driven by the batching engine.

The ingress reaches it through a `DeploymentHandle` and streams its events. Tokenizing with
the model's own chat template happens here, so the template that training used is the one
serving uses. A client that goes away cancels its sequences at the next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator

log = logging.getLogger(__name__)


def _token_str(tokenizer, token_id: int) -> str:
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(int(token_id))])


def _rss_mb() -> float | None:
    """This replica's resident memory (Linux), for flat-memory checks under load."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


class LLMServer:
    def __init__(self, name: str, path: str, max_batch: int = 16, stream_interval_ms: float = 100,
                 torch_threads: int | None = None):
        import torch
        from transformers import AutoTokenizer

        from jobs.awq_loader import awq_settings, load_causal_lm
        from serve.engine import Engine
        from serve.metrics import ServeMetrics

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.name, self.path = name, path
        self.stream_interval_s = stream_interval_ms / 1000
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_causal_lm(path)
        self.quantization = (awq_settings(Path(path)) or {}).get("quant_method")
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        stop_ids = {end_of_turn} if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id else set()
        self.engine = Engine(self.model, self.tokenizer, max_batch=max_batch, stop_token_ids=stop_ids)
        self.engine.start()
        self.metrics = ServeMetrics()
        self.requests = 0
        log.warning("aero: serving %s from %s (%s)", name, path, self.quantization or "fp")

    def info(self) -> dict[str, Any]:
        e = self.engine
        return {"name": self.name, "path": self.path, "context": e.context, "quantization": self.quantization,
                "running": len(e.running), "waiting": e.queue_length(), "steps": e.steps, "cancelled": e.cancelled,
                "requests": self.requests, "rss_mb": _rss_mb(), "torch_threads": e.threads}

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError("the generation engine thread is not running")

    def _prompt_ids(self, req: dict[str, Any]) -> list[int]:
        if req["kind"] == "chat":
            return list(self.tokenizer.apply_chat_template(req["messages"], add_generation_prompt=True,
                                                           tokenize=True, return_dict=True)["input_ids"])
        return list(self.tokenizer(req["prompt"])["input_ids"])

    def fit(self, messages: list[dict[str, str]], slot: str, pieces: list[str], max_tokens: int) -> dict[str, Any]:
        """Replace `slot` in the last message with as many of `pieces` (blank-line separated, in
        order) as the context holds with `max_tokens` to spare; the first piece that does not fit
        whole is cut at a token boundary. Retrieval-augmented prompts use it: only this replica
        knows the tokenizer and the context length. Returns {"messages", "used"} or {"error"}."""
        budget = self.engine.context - max_tokens

        def render(text: str) -> list[dict[str, str]]:
            return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"].replace(slot, text)}]

        def fits(chosen: list[str]) -> bool:
            return len(self._prompt_ids({"kind": "chat", "messages": render("\n\n".join(chosen))})) <= budget

        if not fits([]):
            return {"error": f"the prompt leaves no room in this model's context of {self.engine.context} tokens "
                             f"with max_tokens {max_tokens}"}
        chosen: list[str] = []
        for piece in pieces:
            if fits([*chosen, piece]):
                chosen.append(piece)
                continue
            ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            lo, hi = 0, len(ids)  # the longest prefix that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits([*chosen, self.tokenizer.decode(ids[:mid]) + " ..."]):
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= 8:  # a few words at least
                chosen.append(self.tokenizer.decode(ids[:lo]) + " ...")
            break
        return {"messages": render("\n\n".join(chosen)), "used": len(chosen)}

    def _interval(self) -> float:
        """The stream interval at the engine's present load: `stream_interval_ms` with a full
        batch, proportionally shorter with fewer sequences running. Messages cost CPU at every hop;
        with a full batch that CPU is what decoding lacks, with one stream it is idle anyway (and
        the stream then comes about token by token)."""
        return self.stream_interval_s * min(1.0, len(self.engine.running) / self.engine.max_batch)

    def _resolve(self, event: dict[str, Any]) -> dict[str, Any]:
        """Token ids -> token strings, so the ingress needs no tokenizer."""
        tok = self.tokenizer
        if event.get("tokens"):
            event["tokens"] = [{"token": _token_str(tok, t["id"]), "logprob": t["logprob"],
                                "top": [[_token_str(tok, i), lp] for i, lp in t["top"]]} for t in event["tokens"]]
        if event.get("prompt_logprobs") is not None:
            event["prompt_logprobs"] = [{"token": _token_str(tok, i), "logprob": lp}
                                        for i, lp in zip(event.pop("prompt_ids"), event["prompt_logprobs"])]
        return event

    async def generate(self, req: dict[str, Any]) -> AsyncIterator[list[dict[str, Any]]]:
        """Lists of events for one request with n choices: delta/done per choice, or one error."""
        from serve.engine import SamplingParams, Sequence

        self.requests += 1
        try:
            ids = self._prompt_ids(req)
        except Exception as exc:  # a template that rejects the messages (e.g. role order)
            yield [{"type": "error", "status": 400, "message": f"could not build the prompt: {exc}", "param": "messages"}]
            return
        params = req["params"]
        context = self.engine.context
        if not ids:
            yield [{"type": "error", "status": 400, "message": "the prompt is empty", "param": "prompt"}]
            return
        if req.get("max_tokens_default") and len(ids) < context:  # not asked for: whatever room is left
            params = {**params, "max_tokens": min(params["max_tokens"], context - len(ids))}
            params["min_tokens"] = min(params["min_tokens"], params["max_tokens"])
        if len(ids) + params["max_tokens"] > context:
            yield [{"type": "error", "status": 400, "param": "max_tokens", "code": "context_length_exceeded",
                    "message": f"This model's maximum context length is {context} tokens; the prompt has {len(ids)} "
                               f"tokens and max_tokens is {params['max_tokens']} ({len(ids) + params['max_tokens']} in all)."}]
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i in range(req.get("n", 1)):
            seed = None if params.get("seed") is None else params["seed"] + i
            sp = SamplingParams(**{**params, "seed": seed})
            emit = (lambda e, i=i: loop.call_soon_threadsafe(events.put_nowait, {**e, "index": i}))
            seqs.append(self.engine.submit(Sequence(prompt_ids=ids, params=sp, emit=emit)))
        self.metrics.queue.set(self.engine.queue_length() + len(self.engine.running), tags={"model": self.name})
        remaining, sent = len(seqs), None
        try:
            while remaining:
                # The first token goes at once and alone (even when this loop woke late and more
                # are queued); after it, whatever piled up goes as one message at most every
                # interval (as Ray Serve LLM's stream batching interval): every hop after the
                # replica (handle stream, ingress, SSE, proxy, client) then costs per message, not
                # per token.
                batch = [await events.get()]
                if sent is not None:
                    if (wait := sent + self._interval() - loop.time()) > 0:
                        await asyncio.sleep(wait)
                    while not events.empty():
                        batch.append(events.get_nowait())
                for event in batch:
                    if event["type"] != "delta":
                        remaining -= 1
                        if event["type"] == "done":
                            self.metrics.tokens.inc(event["completion_tokens"], tags={"model": self.name})
                            if event.get("prompt_logprobs") is not None:
                                event["prompt_ids"] = ids
                yield [self._resolve(e) for e in batch]
                sent = loop.time()
        finally:
            for s in seqs:
                s.cancelled = True  # no-op for finished ones; frees the slot of a disconnected client
