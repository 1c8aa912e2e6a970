"""The `serve.feedback` section: where replies and human feedback are stored."""

from __future__ import annotations

from pydantic import Field

from cluster.config import StrictModel


class FeedbackConfig(StrictModel):
    enabled: bool = True
    database: str | None = Field(default=None, description="SQLAlchemy URL (e.g. postgresql+psycopg://...); default: "
                                                           "a SQLite file feedback.db in the serve stage's folder")
    max_comment_chars: int = Field(default=2000, ge=1)
