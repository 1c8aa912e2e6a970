"""The OpenAI-compatible ingress (FastAPI under `@serve.ingress`): auth, routing by `model`,
admission limits, errors in OpenAI's shape, streaming over SSE.

Local models are Ray Serve LLM deployments over vLLM (serve/llm_deployment.py), reached
through their handles with Ray's OpenAI request objects: the client's JSON goes on whole, so
what vLLM serves (token-id prompts, echo, n, seed, structured output) is served here. Remote
upstreams (any OpenAI-compatible server) are reached through httpx. Both kinds of stream go
through one relay, so one gateway fronts them with the same keys, limits and moderation. API
keys reach the replicas only as SHA-256 digests. With moderation on, every input is screened by the moderation deployment before a
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
    new_id,
    now,
    sse,
    usage,
)
from serve.pages.routes import PageRoutes
from serve.qa.routes import QARoutes
from serve.serve_config import ModelSpec, ServeConfig

log = logging.getLogger(__name__)
MAX_MODERATION_INPUTS = 64  # texts per POST /v1/moderations (one embedding batch stays short)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.strip().encode()).hexdigest()


def _error_type(status: int, given: str | None) -> str:
    """OpenAI's error type for a status (vLLM names its own, e.g. BadRequestError)."""
    if status == 400:
        return "invalid_request_error"
    return given or "server_error"


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
                 retriever=None, feedback_url: str | None = None, model_paths: dict[str, str] | None = None):
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
        self.handles = handles  # local model name -> its Ray Serve LLM deployment (LLMServer)
        self.model_paths = model_paths or {}  # their folders: tokenizer and context for Q&A fitting
        self.fitters: dict[str, Any] = {}
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
        payload = await request.json()
        if spec.upstream:
            for i, text in enumerate(screened):
                if text != texts[i]:  # redacted
                    payload["messages"][i]["content"] = text
        return await self._chat(spec, body, messages, context, payload)

    async def _chat(self, spec: ModelSpec, body: ChatRequest, messages: list[dict[str, str]], context: dict[str, Any],
                    payload: dict[str, Any] | None = None):
        """A chat completion of already-screened messages, from a local model or an upstream.
        `payload` is the client's JSON (every field it sent goes on); None for the gateway's own
        requests (the Q&A route)."""
        if payload is None:
            payload = {**body.model_dump(exclude_unset=True), "messages": messages}
        payload = {k: v for k, v in payload.items() if k not in ("store", "metadata")}  # kept here only
        if spec.upstream:
            return await self._remote(spec, "/chat/completions", payload, body, context, body.n)
        return await self._local(spec, "chat", {**payload, "messages": messages}, body, context, body.n)

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest, request: Request):
        self._auth(request)
        self._check_size(request)
        spec = self._spec(body.model)
        context = {"model": spec.name, "request_id": new_id("req"), "endpoint": "completions"}
        prompts = body.prompts()
        if self.moderation is not None:  # token ids are screened as the text they decode to
            texts = [p if isinstance(p, str) else await self._decode(spec, p) for p in prompts]
            screened = await self._screen_input(texts, "prompt", context)
            if isinstance(screened, APIError):
                return self._refusal(body, chat=False)
            prompts = [p if new == old else new for p, old, new in zip(prompts, texts, screened)]  # redacted
        payload = {**await request.json(), "prompt": prompts[0] if body.single_prompt() else prompts}
        choices = body.n * len(prompts)
        if spec.upstream:
            return await self._remote(spec, "/completions", payload, body, context, choices)
        return await self._local(spec, "completions", payload, body, context, choices)

    async def _decode(self, spec: ModelSpec, ids: list[int]) -> str:
        if spec.upstream:
            raise APIError(400, f"model {spec.name} is a remote upstream: moderation cannot read token-id prompts "
                                f"without its tokenizer; send the prompt as text", param="prompt")
        fitter = await self._fitter(spec)
        return fitter.decode(ids)

    async def _fitter(self, spec: ModelSpec):
        """The local model's tokenizer and context (serve/prompt_fit.py), loaded once."""
        from serve.prompt_fit import PromptFitter

        if spec.name not in self.fitters:
            self.fitters[spec.name] = await asyncio.to_thread(PromptFitter, self.model_paths[spec.name],
                                                              spec.max_model_len)
        return self.fitters[spec.name]

    # ---- local models: Ray Serve LLM deployments over vLLM ----
    async def _local(self, spec: ModelSpec, method: str, payload: dict[str, Any], body, context: dict[str, Any],
                     choices: int):
        from pydantic import ValidationError
        from ray.serve.llm.openai_api_models import ChatCompletionRequest as LLMChatRequest
        from ray.serve.llm.openai_api_models import CompletionRequest as LLMCompletionRequest

        chat = method == "chat"
        if payload.get("max_tokens") is None and payload.get("max_completion_tokens") is None:
            payload = {**payload, "max_tokens": spec.default_max_tokens}  # vLLM caps it to the room left
        try:
            req = (LLMChatRequest if chat else LLMCompletionRequest).model_validate({**payload, "model": spec.name})
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            raise APIError(400, f"{where}: {e['msg']}", param=where or None) from None
        self._admit(spec)
        started = time.monotonic()
        stream, refused = None, None
        try:
            stream = getattr(self.handles[spec.name].options(stream=True), method).remote(req)
            first = await asyncio.wait_for(stream.__anext__(), timeout=self.cfg.request_timeout_s)
        except Exception as exc:
            refused = exc
        except BaseException:  # cancelled: the client went away while waiting
            _cancel(stream)
            self._release(spec, 499)
            raise
        if refused is not None:
            _cancel(stream)
            if isinstance(refused, asyncio.TimeoutError):
                self._release(spec, 504)
                raise APIError(504, f"no answer within {self.cfg.request_timeout_s}s", type="timeout") from None
            self._release(spec, 503)
            raise self._overload(spec, refused)
        head = first[0] if isinstance(first, list) and first else first
        if hasattr(head, "error"):  # vLLM's ErrorResponse (e.g. a prompt over the context)
            err = head.error
            status = int(err.code) if str(err.code).isdigit() else 500
            self._release(spec, status)
            raise APIError(status, err.message, type=_error_type(status, err.type), param=err.param)
        self.metrics.ttft.observe(time.monotonic() - started, tags={"model": spec.name})
        if not req.stream:
            status = 499  # unless set below: the client went away (the handler was cancelled)
            try:
                result = head.model_dump(mode="json")
                await self._screen_output(result, chat, context)
                await self._store(result["id"], result, context)
                status = 200
            except APIError as exc:
                status = exc.status
                raise
            finally:
                _cancel(stream)
                self._release(spec, status)
            tokens = (result.get("usage") or {}).get("completion_tokens") or 0
            self.metrics.tokens_per_s.observe(tokens / max(time.monotonic() - started, 1e-6), tags={"model": spec.name})
            return result

        async def lines() -> AsyncIterator[str]:
            """The replica's batches of SSE strings (or error objects), one line at a time."""
            batch = first
            while True:
                for item in batch if isinstance(batch, list) else [batch]:
                    if hasattr(item, "model_dump_json"):
                        item = f"data: {item.model_dump_json()}\n\n"
                    for line in item.splitlines():
                        yield line
                try:
                    batch = await stream.__anext__()
                except StopAsyncIteration:
                    return
                except Exception as exc:  # the replica died mid-stream: the client gets an error event
                    yield "data: " + json.dumps({"error": {"message": f"model {spec.name} failed mid-stream "
                                                                      f"({type(exc).__name__}); retry",
                                                           "type": "server_error", "code": 503}})
                    return

        async def close() -> None:
            _cancel(stream)  # the client left or the stream ended: vLLM drops the request

        return StreamingResponse(self._relay(spec, self._chunk_events(spec, chat, lines()), chat, context, choices, close),
                                 media_type="text/event-stream")

    def _overload(self, spec: ModelSpec, exc: BaseException) -> APIError:
        """Ray Serve refused the request (queue full) or the replica is gone: 503 + Retry-After."""
        from ray.serve.exceptions import BackPressureError

        kind = "backpressure" if isinstance(exc, BackPressureError) else type(exc).__name__
        self.metrics.rejections.inc(tags={"model": spec.name, "reason": kind})
        return APIError(503, f"model {spec.name} is overloaded or unavailable ({kind}); retry", type="overloaded",
                        code="overloaded", headers={"Retry-After": str(self.cfg.retry_after_s)})

    # ---- streams, from a local model or an upstream ----
    @staticmethod
    async def _chunk_events(spec: ModelSpec, chat: bool, lines: AsyncIterator[str]) -> AsyncIterator[dict]:
        """SSE lines of OpenAI chunks as events: `delta` (text), `done` (a choice's finish),
        `usage` (the last chunk of `include_usage`), `error`; each carries its chunk. A chunk
        that brings text and a finish at once is split in two, so the text is screened before
        the finish is sent."""
        async for line in lines:
            if line == "data: [DONE]":
                return
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                err = chunk["error"] or {}
                code = err.get("code")
                numeric = str(code).isdigit()  # vLLM's code is the HTTP status; OpenAI's a name
                status = int(code) if numeric else 500
                yield {"type": "error", "status": status, "message": err.get("message") or "generation failed",
                       "error_type": _error_type(status, err.get("type")), "code": None if numeric else code}
                return
            if "model" in chunk:
                chunk["model"] = spec.name
            if not chunk.get("choices"):
                yield {"type": "usage", "chunk": chunk}
                continue
            for c in chunk["choices"]:
                one = {**chunk, "choices": [c]}
                text = ((c.get("delta") or {}).get("content") or "") if chat else (c.get("text") or "")
                finish = c.get("finish_reason")
                if finish and text:
                    yield {"type": "delta", "index": c.get("index", 0), "text": text,
                           "chunk": {**one, "choices": [{**c, "finish_reason": None}]}}
                    c = {**c, "logprobs": None, **({"delta": {}} if chat else {"text": ""})}
                    one, text = {**chunk, "choices": [c]}, ""
                yield {"type": "done" if finish else "delta", "index": c.get("index", 0), "text": text, "chunk": one,
                       "finish_reason": finish}

    async def _relay(self, spec: ModelSpec, events: AsyncIterator[dict], chat: bool, context: dict[str, Any],
                     choices: int, close) -> AsyncIterator[str]:
        """The client's SSE stream: events screened by moderation in windows, stored when asked
        for, ended by `[DONE]` (after an error too); `close` frees the source."""
        status, rid = 200, None
        try:
            if self.moderation is not None:
                events = self._screened(events, context)
            if "store" in context:
                events = self._recorded(events, None, choices, context)
            async with asyncio.timeout(self.cfg.request_timeout_s):
                async for e in events:
                    if e["type"] == "error":
                        status = e.get("status", 500)
                        yield sse(APIError(status, e["message"], type=e.get("error_type") or "server_error",
                                           code=e.get("code")).body())
                        break
                    chunk = e.get("chunk")
                    if chunk is None:  # text rewritten by redaction
                        chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": now(), "model": spec.name,
                                 "choices": [{"index": e["index"], "finish_reason": None, "logprobs": None, **(
                                     {"delta": {"content": e["text"]}} if chat else {"text": e["text"]})}]}
                    rid = chunk.get("id") or rid
                    yield sse(chunk)
            yield sse("[DONE]")
        except TimeoutError:
            status = 504
            yield sse(APIError(504, f"generation took longer than {self.cfg.request_timeout_s}s", type="timeout").body())
        finally:
            await close()
            self._release(spec, status)

    # ---- remote upstreams ----
    async def _remote(self, spec: ModelSpec, path: str, payload: dict[str, Any], body, context: dict[str, Any],
                      choices: int):
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
        return StreamingResponse(self._relay(spec, self._chunk_events(spec, chat, response.aiter_lines()), chat, context,
                                             choices, response.aclose), media_type="text/event-stream")

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

