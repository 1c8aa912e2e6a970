"""`POST /v1/qa` and `GET /v1/qa/passages/{id}`: retrieval-augmented answers.

The question is screened by moderation like any input, the retriever deployment returns the
top-k passages, the prompt template numbers them, and the answering model's tokenizer fits as
many as its context holds (cutting the last one; serve/prompt_fit.py) before the gateway's ordinary chat path
generates and screens the answer. The reply lists the passages it was given as sources, each
with a link to the passage page; with `store: true` it is kept for feedback, with its
template version and sources.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field

from data_jobs.chat_data import numbered
from serve.api_app import app
from serve.openai_api import APIError, ChatRequest, new_id

_SLOT = "\x00passages\x00"  # where the passages go; no user text can contain it after screening


class QARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str
    model: str | None = None
    k: int | None = Field(default=None, ge=1, le=20)
    template: str | None = Field(default=None, pattern=r"^[a-z0-9_-]+\.v\d+$")
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0, le=2)
    store: bool = False


class QARoutes:
    """Route group of the gateway (needs its auth, moderation, handles and `_chat`)."""

    @app.post("/v1/qa")
    async def qa(self, body: QARequest, request: Request) -> dict[str, Any]:
        self._auth(request)
        if self.retriever is None:
            raise APIError(404, "Q&A is off on this server (serve.qa.index is not set)", code="qa_disabled")
        question = body.question.replace(_SLOT, "").strip()
        if not question:
            raise APIError(400, "question is empty", param="question")
        limit = self.cfg.qa.max_question_chars
        if len(question) > limit:
            raise APIError(400, f"question has {len(question)} characters; the limit is {limit}", param="question",
                           code="input_too_long")
        spec = self._spec(body.model or self.cfg.qa_model)
        template = self.qa_template if body.template is None else self._template(body.template, {"question", "passages"})
        context = {"model": spec.name, "request_id": new_id("req"), "endpoint": "qa"}
        screened = await self._screen_input([question], "question", context)
        if isinstance(screened, APIError):  # blocked, with a refusal message configured
            return {"id": new_id("qa"), "object": "qa.answer", "model": spec.name, "question": question,
                    "answer": self.mcfg.refusal_message, "finish_reason": "content_filter",
                    "template": template.ref, "sources": []}
        question = screened[0]
        hits = await self.retriever.search.remote(question, body.k or self.cfg.qa.k)
        pieces = numbered([(h["title"], h["text"]) for h in hits])
        max_tokens = body.max_tokens or self.cfg.qa.max_tokens
        messages = template.messages(question=question, passages=_SLOT)
        if spec.source:
            fitter = await self._fitter(spec)
            fitted = await asyncio.to_thread(fitter.fit, messages, _SLOT, pieces, max_tokens)
            if "error" in fitted and template.few_shot:  # a small context: the examples go first
                messages = template.messages(question=question, passages=_SLOT, few_shot=False)
                fitted = await asyncio.to_thread(fitter.fit, messages, _SLOT, pieces, max_tokens)
            if "error" in fitted:
                raise APIError(400, fitted["error"], param="max_tokens", code="context_length_exceeded")
            messages, used = fitted["messages"], fitted["used"]
        else:
            messages, used = [{**m, "content": m["content"].replace(_SLOT, "\n\n".join(pieces))} for m in messages], len(hits)
        root = request.scope.get("root_path", "").rstrip("/")
        sources = [{"n": i, "passage_id": h["id"], "doc_id": h["doc_id"], "title": h["title"], "section": h["section"],
                    "score": h["score"], "url": f"{root}/passage?id={h['id']}", "text": h["text"]}
                   for i, h in enumerate(hits[:used], 1)]
        ref = f"{template.ref}@{template.digest}"
        if body.store and self.feedback is not None:
            context["store"] = {"endpoint": "qa", "messages": messages, "template": ref,
                                "sources": [{k: s[k] for k in ("n", "passage_id", "doc_id", "title")} for s in sources]}
        chat = ChatRequest(model=spec.name, messages=messages, max_tokens=max_tokens, temperature=body.temperature)
        result = await self._chat(spec, chat, messages, context)
        choice = result["choices"][0]
        return {"id": result["id"], "object": "qa.answer", "created": result.get("created"), "model": spec.name,
                "question": question, "answer": choice["message"]["content"], "finish_reason": choice["finish_reason"],
                "template": ref, "sources": sources, "usage": result.get("usage")}

    @app.get("/v1/qa/passages/{passage_id}")
    async def qa_passage(self, passage_id: int, request: Request) -> dict[str, Any]:
        self._auth(request)
        if self.retriever is None:
            raise APIError(404, "Q&A is off on this server (serve.qa.index is not set)", code="qa_disabled")
        passage = await self.retriever.passage.remote(passage_id)
        if passage is None:
            raise APIError(404, f"no passage has id {passage_id}", param="passage_id", code="passage_not_found")
        return passage
