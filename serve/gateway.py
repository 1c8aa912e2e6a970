"""The OpenAI-compatible ingress (FastAPI under `@serve.ingress`): auth, routing by `model`,
admission limits, errors in OpenAI's shape, streaming over SSE.

Local models are reached through their `LLMServer` deployment handles (streaming through the
handle); remote upstreams (any OpenAI-compatible server) through httpx, so one gateway fronts
both with the same keys, limits and moderation. API keys reach the replicas only as SHA-256
digests. With moderation on, every input is screened by the moderation deployment before a
model sees it, and output is screened before the client does: whole answers, or streamed
text held back and screened in windows. Requests that set `store: true` are kept in the
feedback database. The Q&A, feedback and page routes live in their own modules
(`serve/qa/routes.py`, `serve/feedback/routes.py`, `serve/pages/routes.py`) as bases of
`Gateway`, on the same FastAPI app (`serve/api_app.py`).
"""


import asyncio
import collections
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from ray import serve

from serve.api_app import app
from serve.feedback.routes import FeedbackRoutes
from serve.moderation.rules import redact
from serve.openai_api import (
    APIError,
    ChatRequest,
    CompletionRequest,
    ModerationRequest,
    chat_logprobs,
    completion_logprobs,
    new_id,
    now,
    sse,
    usage,
)
from serve.pages.routes import PageRoutes
from serve.qa.routes import QARoutes
from serve.serve_config import ModelSpec, ServeConfig

log = logging.getLogger(__name__)
FLUSH = {"type": "flush"}  # ends one replica batch in a stream of events
MAX_MODERATION_INPUTS = 64  # texts per POST /v1/moderations (one embedding batch stays short)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def _cancel(stream) -> None:
    """Cancel a handle stream; a refused request re-raises its BackPressureError on cancel."""
    if stream is None:
        return
    try:
        stream.cancel()
    except Exception:
        pass


def refusal_reasons(verdicts: list[dict], roles: list[str] | None = None) -> list[dict]:
    """What blocked an input, per blocking category: which text (index, and its chat role), the
    score, the threshold and what scored it, so a deployer can tune the policy."""
    return [{"index": i, "role": roles[i] if roles else None, **r}
            for i, v in enumerate(verdicts) for r in v.get("reasons", []) if v["actions"].get(r["category"]) == "block"]


def _blocked(verdicts: list[dict]) -> list[str]:
    """The categories whose policy blocks, over moderation verdicts."""
    return sorted({c for v in verdicts for c, action in v["actions"].items() if action == "block"})


class _Flagged(Exception):
    """A screened window of streamed output was blocked."""

    def __init__(self, categories: list[str]):
        super().__init__(", ".join(categories))
        self.categories = categories


@serve.ingress(app)
class Gateway(QARoutes, FeedbackRoutes, PageRoutes):
    def __init__(self, config: dict[str, Any], handles: dict[str, Any], key_digests: list[str], moderation=None,
                 retriever=None, feedback_url: str | None = None):
        import httpx

        from serve.metrics import ServeMetrics

        self.cfg = ServeConfig.model_validate(config)
        self.retriever = retriever
        self.feedback = None
        if self.cfg.feedback.enabled and feedback_url:
            from serve.feedback.store import FeedbackStore

            self.feedback = FeedbackStore(feedback_url)
        self.templates: dict[str, Any] = {}
        self.chat_template = self._template(self.cfg.pages.chat_template, {"question"})
        self.qa_template = self._template(self.cfg.qa.template, {"question", "passages"}) if retriever else None
        self.specs: dict[str, ModelSpec] = {m.name: m for m in self.cfg.models}
        self.handles = handles
        self.moderation = moderation if self.cfg.moderation.enabled else None
        self.mcfg = self.cfg.moderation
        self.digests = [bytes.fromhex(d) for d in key_digests]
        if self.cfg.auth.enabled and not self.digests:
            raise RuntimeError("auth is on but no API keys were given")
        self.inflight: collections.Counter[str] = collections.Counter()
        self.metrics = ServeMetrics()
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(self.cfg.request_timeout_s, connect=10))

    # ---- plumbing ----
    def _auth(self, request: Request) -> None:
        if not self.cfg.auth.enabled:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        presented = hashlib.sha256(key.strip().encode()).digest()
        ok = False
        for d in self.digests:  # every digest is compared: the time does not depend on which key matched
            ok |= hmac.compare_digest(presented, d)
        if scheme.lower() != "bearer" or not key or not ok:
            raise APIError(401, "Incorrect API key provided (send: Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    def _spec(self, name: str) -> ModelSpec:
        if name not in self.specs:
            raise APIError(404, f"The model `{name}` does not exist (available: {', '.join(self.specs)})",
                           param="model", code="model_not_found")
        return self.specs[name]

    def _admit(self, spec: ModelSpec) -> None:
        if self.inflight[spec.name] >= spec.max_concurrent:
            self.metrics.rejections.inc(tags={"model": spec.name, "reason": "max_concurrent"})
            raise APIError(429, f"model {spec.name} is at its limit of {spec.max_concurrent} concurrent requests; retry",
                           type="rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})
        self.inflight[spec.name] += 1

    def _release(self, spec: ModelSpec, status: int) -> None:
        self.inflight[spec.name] -= 1
        self.metrics.requests.inc(tags={"model": spec.name, "status": str(status)})

    def _check_size(self, request: Request) -> None:
        size = int(request.headers.get("content-length") or 0)
        if size > self.cfg.max_request_bytes:
            raise APIError(413, f"request body of {size} bytes is over the limit of {self.cfg.max_request_bytes}")

    # ---- routes ----
    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"object": "list", "data": [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "aerollms" if m.source else "upstream"}
            for m in self.cfg.models]}

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest, request: Request):
        self._auth(request)
        self._check_size(request)
        spec = self._spec(body.model)
        try:
            texts = [m.text() for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        context = {"model": spec.name, "request_id": new_id("req"), "endpoint": "chat"}
        screened = await self._screen_input(texts, "messages", context, [m.role for m in body.messages])
        if isinstance(screened, APIError):
            return self._refusal(body, chat=True)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": text}
                    for m, text in zip(body.messages, screened)]
        if body.store and self.feedback is not None:
            template = (body.metadata or {}).get("prompt_template")
            context["store"] = {"endpoint": "chat", "template": template[:128] if template else None,
                                "messages": messages}
        payload = None
        if spec.upstream:
            payload = await request.json()
            for key in ("store", "metadata"):  # kept here, not at the upstream
                payload.pop(key, None)
            for i, text in enumerate(screened):
                if text != texts[i]:  # redacted
                    payload["messages"][i]["content"] = text
        return await self._chat(spec, body, messages, context, payload)

    async def _chat(self, spec: ModelSpec, body: ChatRequest, messages: list[dict[str, str]], context: dict[str, Any],
                    payload: dict[str, Any] | None = None):
        """A chat completion of already-screened messages, from a local model or an upstream."""
        if spec.upstream:
            payload = payload or {**body.model_dump(exclude_none=True, exclude={"store", "metadata"}),
                                  "messages": messages}
            return await self._remote(spec, "/chat/completions", payload, body, context)
        max_tokens = body.max_completion_tokens or body.max_tokens or spec.default_max_tokens
        req = {"kind": "chat", "messages": messages, "n": body.n, "params": self._params(
            body, spec, max_tokens, logprobs=body.logprobs, top_logprobs=body.top_logprobs or 0),
            "max_tokens_default": not (body.max_completion_tokens or body.max_tokens)}
        return await self._local(spec, req, body, chat=True, context=context)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        self._check_size(request)
        spec = self._spec(body.model)
        context = {"model": spec.name, "request_id": new_id("req"), "endpoint": "completions"}
        screened = await self._screen_input([body.prompt], "prompt", context)
        if isinstance(screened, APIError):
            return self._refusal(body, chat=False)
        body.prompt = screened[0]  # what the model sees (and what echo returns)
        if spec.upstream:
            return await self._remote(spec, "/completions", {**await request.json(), "prompt": body.prompt}, body, context)
        max_tokens = body.max_tokens or spec.default_max_tokens
        req = {"kind": "completion", "prompt": body.prompt, "n": body.n, "params": self._params(
            body, spec, max_tokens, logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0, echo=body.echo),
            "max_tokens_default": not body.max_tokens}
        return await self._local(spec, req, body, chat=False, context=context)

    @staticmethod
    def _params(body, spec: ModelSpec, max_tokens: int, **extra) -> dict[str, Any]:
        penalties = {k: v if (v := getattr(body, k)) is not None else getattr(spec.sampling_defaults, k)
                     for k in ("frequency_penalty", "presence_penalty", "repetition_penalty")}
        return {"max_tokens": max_tokens, "min_tokens": min(body.min_tokens, max_tokens), "temperature": body.temperature,
                "top_p": body.top_p, "seed": body.seed, "stop": body.stop or [], **penalties, **extra}

    # ---- local models ----
    async def _local(self, spec: ModelSpec, req: dict[str, Any], body, *, chat: bool, context: dict[str, Any]):
        self._admit(spec)
        started = time.monotonic()
        stream, refused = None, None
        try:
            stream = self.handles[spec.name].options(stream=True).generate.remote(req)
            first = await asyncio.wait_for(stream.__anext__(), timeout=self.cfg.request_timeout_s)
        except Exception as exc:
            refused = exc
        except BaseException:  # cancelled: the client went away while waiting
            _cancel(stream)
            self._release(spec, 499)
            raise
        if refused is not None:
            _cancel(stream)
            self._release(spec, 503)
            raise self._overload(spec, refused)
        if first[0]["type"] == "error":
            err = first[0]
            self._release(spec, err.get("status", 500))
            raise APIError(err.get("status", 500), err["message"], param=err.get("param"), code=err.get("code"))
        self.metrics.ttft.observe(time.monotonic() - started, tags={"model": spec.name})
        events = self._events(first, stream)
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        if body.stream:
            if self.moderation is not None:
                events = self._screened(events, context)
            if "store" in context:
                events = self._recorded(events, rid, body.n, context)
            return StreamingResponse(self._sse(spec, events, stream, body, rid, created, chat, started),
                                     media_type="text/event-stream")
        status = 499  # unless set below: the client went away (the handler was cancelled)
        try:
            result = await asyncio.wait_for(self._collect(events, body, rid, created, chat), self.cfg.request_timeout_s)
            await self._screen_output(result, chat, context)
            await self._store(rid, result, context)
            status = 200
        except asyncio.TimeoutError:
            status = 504
            raise APIError(504, f"generation took longer than {self.cfg.request_timeout_s}s", type="timeout") from None
        except APIError as exc:
            status = exc.status
            raise
        finally:
            if status != 200:
                _cancel(stream)
            self._release(spec, status)
        tokens = result["usage"]["completion_tokens"]
        self.metrics.tokens_per_s.observe(tokens / max(time.monotonic() - started, 1e-6), tags={"model": spec.name})
        return result

    def _overload(self, spec: ModelSpec, exc: BaseException) -> APIError:
        """Ray Serve refused the request (queue full) or the replica is gone: 503 + Retry-After."""
        from ray.serve.exceptions import BackPressureError

        kind = "backpressure" if isinstance(exc, BackPressureError) else type(exc).__name__
        self.metrics.rejections.inc(tags={"model": spec.name, "reason": kind})
        return APIError(503, f"model {spec.name} is overloaded or unavailable ({kind}); retry", type="overloaded",
                        code="overloaded", headers={"Retry-After": str(self.cfg.retry_after_s)})

    @staticmethod
    async def _events(first: list[dict], stream) -> AsyncIterator[dict]:
        """The replica's batches of events, one event at a time, each batch closed by a
        `flush` marker: the SSE writer sends a batch as one body chunk."""
        for event in first:
            yield event
        yield FLUSH
        async for batch in stream:
            for event in batch:
                yield event
            yield FLUSH

    async def _collect(self, events, body, rid: str, created: int, chat: bool) -> dict[str, Any]:
        texts: dict[int, list[str]] = collections.defaultdict(list)
        tokens: dict[int, list[dict]] = collections.defaultdict(list)
        done: dict[int, dict] = {}
        async for e in events:
            if e["type"] == "flush":
                continue
            if e["type"] == "error":
                raise APIError(e.get("status", 500), e["message"], type="server_error")
            if e["type"] == "delta":
                texts[e["index"]].append(e["text"])
                tokens[e["index"]] += e["tokens"]
            else:
                done[e["index"]] = e
        choices = []
        for i in range(body.n):
            text, d = "".join(texts[i]), done[i]
            if chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text},
                          "finish_reason": d["finish_reason"],
                          "logprobs": chat_logprobs(tokens[i]) if body.logprobs else None}
            else:
                logprobs = None
                if body.logprobs is not None:
                    gen = completion_logprobs(tokens[i], offset=len(body.prompt) if body.echo else 0)
                    if body.echo:
                        prompt = completion_logprobs([{**p, "top": []} for p in d["prompt_logprobs"]])
                        logprobs = {k: prompt[k] + gen[k] for k in gen}
                    else:
                        logprobs = gen
                choice = {"index": i, "text": (body.prompt if body.echo else "") + text,
                          "finish_reason": d["finish_reason"], "logprobs": logprobs}
            choices.append(choice)
        prompt_tokens = done[0]["prompt_tokens"]
        completion_tokens = sum(d["completion_tokens"] for d in done.values())
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    async def _sse(self, spec: ModelSpec, events, stream, body, rid: str, created: int, chat: bool,
                   started: float) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        status, completion_tokens, prompt_tokens = 200, 0, 0

        def chunk(index: int, **fields) -> dict[str, Any]:
            if chat:
                delta = {k: v for k, v in fields.items() if k in ("role", "content")}
                choice = {"index": index, "delta": delta, "finish_reason": fields.get("finish_reason"),
                          "logprobs": fields.get("logprobs")}
            else:
                choice = {"index": index, "text": fields.get("content", ""), "finish_reason": fields.get("finish_reason"),
                          "logprobs": fields.get("logprobs")}
            return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": [choice]}

        # Deltas of one replica batch are merged per choice and the batch goes out as one body
        # chunk: under load, when tokens pile up between reads, every hop after the replica
        # (ingress, proxy, client) handles one message instead of one per token.
        held: dict[int, list[dict]] = {}

        def merged() -> list[str]:
            out = []
            for i, evs in held.items():
                text, toks = "".join(e["text"] for e in evs), [t for e in evs for t in e["tokens"]]
                lp = (chat_logprobs(toks) if chat else completion_logprobs(toks)) if toks else None
                if text or lp:
                    out.append(sse(chunk(i, content=text, logprobs=lp)))
            held.clear()
            return out

        try:
            if chat:
                for i in range(body.n):
                    yield sse(chunk(i, role="assistant", content=""))
            elif body.echo:
                for i in range(body.n):
                    yield sse(chunk(i, content=body.prompt))
            async with asyncio.timeout(self.cfg.request_timeout_s):
                out: list[str] = []
                async for e in events:
                    if e["type"] == "flush":
                        out += merged()
                        if out:
                            yield "".join(out)
                            out = []
                    elif e["type"] == "error":
                        status = e.get("status", 500)
                        out += merged()
                        out.append(sse(APIError(status, e["message"], type=e.get("error_type", "server_error"),
                                                code=e.get("code")).body()))
                        break
                    elif e["type"] == "delta":
                        held.setdefault(e["index"], []).append(e)
                    else:
                        out += merged()
                        completion_tokens += e["completion_tokens"]
                        prompt_tokens = e["prompt_tokens"]
                        out.append(sse(chunk(e["index"], finish_reason=e["finish_reason"])))
                out += merged()
                if out:
                    yield "".join(out)
            if body.include_usage():
                yield sse({"id": rid, "object": obj, "created": created, "model": body.model, "choices": [],
                           "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except TimeoutError:
            status = 504
            yield sse(APIError(504, f"generation took longer than {self.cfg.request_timeout_s}s", type="timeout").body())
        finally:
            _cancel(stream)  # the client left or the stream ended: free the sequences in the engine
            self._release(spec, status)
            if completion_tokens:
                self.metrics.tokens_per_s.observe(completion_tokens / max(time.monotonic() - started, 1e-6),
                                                  tags={"model": spec.name})

    # ---- remote upstreams ----
    async def _remote(self, spec: ModelSpec, path: str, payload: dict[str, Any], body, context: dict[str, Any]):
        import httpx

        stream, chat = body.stream, path == "/chat/completions"

        self._admit(spec)
        url = spec.upstream.rstrip("/") + path
        key = os.environ.get(spec.api_key_env or "", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {**payload, "model": spec.upstream_model or spec.name}
        try:
            request = self.http.build_request("POST", url, json=payload, headers=headers)
            response = await self.http.send(request, stream=True)
        except httpx.HTTPError as exc:
            self._release(spec, 502)
            raise APIError(502, f"upstream {spec.upstream} failed: {type(exc).__name__}", type="upstream_error") from None
        if response.status_code >= 400:
            raw = await response.aread()
            await response.aclose()
            self._release(spec, response.status_code)
            try:
                err = json.loads(raw)["error"]
                raise APIError(response.status_code, f"upstream: {err.get('message')}", type=err.get("type") or "upstream_error",
                               param=err.get("param"), code=err.get("code"))
            except (ValueError, KeyError, TypeError):
                raise APIError(502, f"upstream answered {response.status_code}", type="upstream_error") from None
        if not stream:
            try:
                data = json.loads(await response.aread())
            finally:
                await response.aclose()
                self._release(spec, 200)
            await self._screen_output(data, chat, context)
            await self._store(data.get("id") or new_id("chatcmpl"), data, context)
            return {**data, "model": spec.name}

        async def chunks() -> AsyncIterator[dict]:
            """The upstream's chunks as delta / done events (the chunk rides along)."""
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    return
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line[6:])
                if "model" in chunk:
                    chunk["model"] = spec.name
                choices = chunk.get("choices") or [{}]
                c = choices[0]
                text = (c.get("delta") or {}).get("content") or "" if chat else c.get("text") or ""
                kind = "done" if c.get("finish_reason") else "delta"
                yield {"type": kind, "index": c.get("index", 0), "text": text, "tokens": [], "chunk": chunk,
                       "finish_reason": c.get("finish_reason")}

        async def relay() -> AsyncIterator[str]:
            try:
                events = chunks() if self.moderation is None else self._screened(chunks(), context)
                if "store" in context:
                    events = self._recorded(events, None, body.n, context)
                async for e in events:
                    if e["type"] == "error":
                        yield sse(APIError(e["status"], e["message"], type=e["error_type"], code=e["code"]).body())
                        break
                    chunk = e.get("chunk")
                    if chunk is None:  # text rewritten by redaction
                        chunk = {"object": "chat.completion.chunk" if chat else "text_completion", "model": spec.name,
                                 "choices": [{"index": e["index"], "finish_reason": None, **(
                                     {"delta": {"content": e["text"]}} if chat else {"text": e["text"]})}]}
                    yield sse(chunk)
                yield sse("[DONE]")
            finally:
                await response.aclose()
                self._release(spec, 200)

        return StreamingResponse(relay(), media_type="text/event-stream")

    # ---- templates and stored replies ----
    def _template(self, ref: str, needs: set[str]):
        """A prompt template by reference, loaded once (a bad one is a clear 400 / startup error)."""
        from cluster.errors import UserError
        from serve.prompt_templates import load_template

        if ref not in self.templates:
            try:
                self.templates[ref] = load_template(ref, self.cfg.prompt_dirs, needs)
            except UserError as exc:
                raise APIError(400, str(exc), param="template") from None
        return self.templates[ref]

    async def _store(self, rid: str, result: dict[str, Any], context: dict[str, Any]) -> None:
        """Keep a reply whose request asked for it (`store: true`), as the client received it."""
        if "store" not in context:
            return
        answers = [{"text": (c.get("message") or {}).get("content") or c.get("text") or "",
                    "finish_reason": c.get("finish_reason")} for c in result.get("choices", [])]
        await self._store_answers(rid, answers, context)

    async def _store_answers(self, rid: str, answers: list[dict[str, Any]], context: dict[str, Any]) -> None:
        st = context["store"]
        try:
            await asyncio.to_thread(self.feedback.add_reply, rid, endpoint=st["endpoint"], model=context["model"],
                                    messages=st["messages"], answers=answers, template=st.get("template"),
                                    sources=st.get("sources"))
        except Exception as exc:  # the answer still goes out; feedback on it will say it is unknown
            log.warning("aero: could not store reply %s (%s)", rid, type(exc).__name__)

    async def _recorded(self, events: AsyncIterator[dict], rid: str | None, n: int,
                        context: dict[str, Any]) -> AsyncIterator[dict]:
        """Pass stream events through; once every choice is done, store the reply (before the
        client sees the last finish, so its feedback never arrives first)."""
        texts: dict[int, list[str]] = collections.defaultdict(list)
        finish: dict[int, str | None] = {}
        async for e in events:
            i = e.get("index", 0)
            rid = rid or (e.get("chunk") or {}).get("id")
            if e["type"] in ("delta", "done"):
                texts[i].append(e.get("text") or "")
            if e["type"] == "done":
                finish[i] = e.get("finish_reason")
                if len(finish) == n:
                    await self._store_answers(rid or new_id("chatcmpl"), [
                        {"text": "".join(texts[k]), "finish_reason": finish.get(k)} for k in range(n)], context)
            yield e

    # ---- moderation ----
    async def _moderate(self, texts: list[str], direction: str, context: dict[str, Any],
                        roles: list[str] | None = None) -> list[dict]:
        try:
            return await self.moderation.screen.remote(texts, direction, context, roles)
        except Exception as exc:  # the moderation deployment refused (queue full) or is gone: fail closed
            from ray.serve.exceptions import BackPressureError

            kind = "backpressure" if isinstance(exc, BackPressureError) else type(exc).__name__
            self.metrics.rejections.inc(tags={"model": context.get("model", "-"), "reason": f"moderation_{kind}"})
            raise APIError(503, f"moderation is overloaded or unavailable ({kind}); retry", type="overloaded",
                           code="overloaded", headers={"Retry-After": str(self.cfg.retry_after_s)}) from None

    async def _screen_input(self, texts: list[str], param: str, context: dict[str, Any],
                            roles: list[str] | None = None) -> list[str] | APIError:
        """Texts as the model may see them (redacted), or the APIError of a blocked input when a
        refusal message is configured (without one, the error is raised: a 400)."""
        if self.moderation is None:
            return texts
        for i, t in enumerate(texts):
            if len(t) > self.mcfg.max_input_chars:
                raise APIError(400, f"{param}[{i}] has {len(t)} characters; moderation screens at most "
                                    f"{self.mcfg.max_input_chars}", param=param, code="input_too_long")
        verdicts = await self._moderate(texts, "input", context, roles)
        blocked = _blocked(verdicts)
        if blocked:
            why = refusal_reasons(verdicts, roles)
            where = "; ".join(f"{param}[{r['index']}]" + (f" ({r['role']})" if r["role"] else "") +
                              f" {r['category']} {r['score']:.2f} >= {r['threshold']:.2f}" for r in why)
            err = APIError(400, f"the input was flagged by moderation: {where}; it was not sent to the model",
                           param=param, code="content_policy_violation", extra={"moderation": why})
            if self.mcfg.refusal_message is None:
                raise err
            return err
        return [v["text"] if v["action"] == "redact" else t for t, v in zip(texts, verdicts)]

    def _refusal(self, body, *, chat: bool):
        """A blocked input answered with the configured refusal text (finish_reason content_filter)."""
        text, rid, created = self.mcfg.refusal_message, new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion" if chat else "text_completion"
        choices = [{"index": i, "finish_reason": "content_filter", "logprobs": None,
                    **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
                   for i in range(body.n)]
        if not body.stream:
            return {"id": rid, "object": obj, "created": created, "model": body.model, "choices": choices,
                    "usage": usage(0, 0)}

        async def stream() -> AsyncIterator[str]:
            for c in choices:
                delta = {"delta": {"role": "assistant", "content": text}} if chat else {"text": text}
                yield sse({"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": body.model,
                           "choices": [{"index": c["index"], "finish_reason": "content_filter", "logprobs": None, **delta}]})
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def _screen_output(self, result: dict[str, Any], chat: bool, context: dict[str, Any]) -> None:
        """Screen every choice of a whole answer; blocked text is withheld, PII redacted."""
        if self.moderation is None or not result.get("choices"):
            return
        texts = [(c.get("message") or {}).get("content") or "" if chat else c.get("text") or "" for c in result["choices"]]
        verdicts = await self._moderate(texts, "output", context)
        for c, v in zip(result["choices"], verdicts):
            if v["action"] == "block":
                new = self.mcfg.refusal_message or ""
                c["finish_reason"], c["logprobs"] = "content_filter", None
            elif v["action"] == "redact":
                new = v["text"]
            else:
                continue
            if chat:
                c["message"]["content"] = new
            else:
                c["text"] = new

    async def _screened(self, events: AsyncIterator[dict], context: dict[str, Any]) -> AsyncIterator[dict]:
        """Stream events with generated text held back and screened in windows of
        `output_window_chars` (with the last window as overlap). A window is released up to its
        last whitespace, so an e-mail or key is never split across two windows. A blocked window
        ends the stream with an error event; nothing after it is sent."""
        window = self.mcfg.output_window_chars
        pending: dict[int, list[dict]] = collections.defaultdict(list)
        size: collections.Counter[int] = collections.Counter()
        tail: dict[int, str] = collections.defaultdict(str)

        async def release(i: int, final: bool) -> list[dict]:
            evs = pending[i]
            if not final:
                cut = max((k for k, e in enumerate(evs) if any(ch.isspace() for ch in e["text"])), default=None)
                if cut is None:
                    return []
                evs = evs[:cut + 1]
            pending[i] = pending[i][len(evs):]
            size[i] = sum(len(e["text"]) for e in pending[i])
            text = "".join(e["text"] for e in evs)
            if not text.strip():
                return evs
            v = (await self._moderate([tail[i] + text], "output", context))[0]
            if v["action"] == "block":
                raise _Flagged(_blocked([v]))
            tail[i] = (tail[i] + text)[-window:]
            if v["action"] == "redact":
                cats = {c for c, f in v["categories"].items() if f}
                red = redact(text, pii="pii" in cats, secrets="secrets" in cats)
                if red != text:
                    return [{"type": "delta", "index": i, "text": red, "tokens": []}]
            return evs

        try:
            async for e in events:
                i = e.get("index", 0)
                if e["type"] == "delta":
                    pending[i].append(e)
                    size[i] += len(e["text"])
                    if size[i] >= window:
                        for out in await release(i, final=False):
                            yield out
                elif e["type"] == "done":
                    for out in await release(i, final=True):
                        yield out
                    yield e
                else:
                    yield e
        except _Flagged as flagged:
            yield {"type": "error", "status": 400, "error_type": "invalid_request_error", "code": "content_filter",
                   "message": f"the output was flagged by moderation ({', '.join(flagged.categories)}); "
                              f"the rest of the answer is withheld"}

    @app.post("/v1/moderations")
    async def moderations(self, body: ModerationRequest, request: Request) -> dict[str, Any]:
        self._auth(request)
        self._check_size(request)
        if self.moderation is None:
            raise APIError(404, "moderation is off on this server (serve.moderation.enabled: false)",
                           code="moderation_disabled")
        try:
            texts = body.texts()
        except ValueError as exc:
            raise APIError(400, str(exc), param="input") from None
        if len(texts) > MAX_MODERATION_INPUTS:
            raise APIError(400, f"input has {len(texts)} items; send at most {MAX_MODERATION_INPUTS} per request",
                           param="input")
        for i, t in enumerate(texts):
            if len(t) > self.mcfg.max_input_chars:
                raise APIError(400, f"input[{i}] has {len(t)} characters; the limit is {self.mcfg.max_input_chars}",
                               param="input", code="input_too_long")
        verdicts = await self._moderate(texts, "api", {"endpoint": "moderations"})
        return {"id": new_id("modr"), "model": body.model or "aero-moderation-1", "results": [
            {"flagged": v["flagged"], "categories": v["categories"], "category_scores": v["scores"],
             "category_applied_input_types": {c: ["text"] for c in v["categories"]}} for v in verdicts]}

