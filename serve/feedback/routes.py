"""`POST /v1/feedback`: a thumbs up/down (with an optional comment) on one answer of a stored
reply, or, for a reply with two answers, which one the person preferred."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.api_app import app
from serve.openai_api import APIError


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=64, description="the reply's id (`id` of the completion or Q&A answer)")
    index: int = Field(default=0, ge=0, le=7, description="which answer (choice) of the reply is rated")
    rating: Literal["up", "down"] | None = None
    comment: str | None = None
    preferred: int | None = Field(default=None, ge=0, le=1, description="comparison: the preferred answer (0 or 1)")

    @model_validator(mode="after")
    def _one_kind(self) -> "FeedbackRequest":
        if (self.rating is None) == (self.preferred is None):
            raise ValueError("give either `rating` (up/down, with an optional comment) or `preferred` (0/1)")
        if self.preferred is not None and self.comment:
            raise ValueError("a comparison takes no comment")
        return self


class FeedbackRoutes:
    """Route group of the gateway (needs its auth and feedback store)."""

    @app.post("/v1/feedback")
    async def feedback_route(self, body: FeedbackRequest, request: Request) -> dict[str, Any]:
        from serve.feedback.store import UnknownReply

        self._auth(request)
        if self.feedback is None:
            raise APIError(404, "feedback is off on this server (serve.feedback.enabled: false)", code="feedback_disabled")
        comment = (body.comment or "").strip() or None
        limit = self.cfg.feedback.max_comment_chars
        if comment and len(comment) > limit:
            raise APIError(400, f"comment has {len(comment)} characters; the limit is {limit}", param="comment")
        try:
            if body.preferred is not None:
                row = await asyncio.to_thread(self.feedback.add_comparison, body.id, body.preferred)
                kind = "comparison"
            else:
                row = await asyncio.to_thread(self.feedback.add_rating, body.id, body.index,
                                              1 if body.rating == "up" else -1, comment)
                kind = "rating"
        except UnknownReply as exc:
            raise APIError(400, str(exc), param="id", code="unknown_reply") from None
        return {"object": "feedback", "kind": kind, "id": row, "reply_id": body.id}
