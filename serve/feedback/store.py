"""Replies and human feedback in a database through SQLAlchemy (SQLite by default, any URL).

Tables: `replies` (one request that asked to be stored: the conversation as the model saw it
-- after moderation's redaction --, the model, the prompt template and its digest, the
retrieved sources for Q&A), `answers` (its n choices), `ratings` (thumbs up/down with an
optional comment, per answer) and `comparisons` (which of two answers a person preferred).
The store is synchronous; the gateway calls it in a worker thread.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


class UnknownReply(LookupError):
    """Feedback names a reply id (or answer index) that was never stored."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    pass


class Reply(Base):
    __tablename__ = "replies"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the completion id the client saw
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now, index=True)
    endpoint: Mapped[str] = mapped_column(String(16))  # chat | completions | qa
    model: Mapped[str] = mapped_column(String(128))
    template: Mapped[str | None] = mapped_column(String(128))  # e.g. qa.v1@d4a268f2e95c
    messages: Mapped[list] = mapped_column(JSON)  # the prompt as the model saw it
    sources: Mapped[list | None] = mapped_column(JSON)  # Q&A: the passages it was given
    answers: Mapped[list["Answer"]] = relationship(back_populates="reply", order_by="Answer.index",
                                                   cascade="all, delete-orphan")


class Answer(Base):
    __tablename__ = "answers"
    reply_id: Mapped[str] = mapped_column(ForeignKey("replies.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(Text)
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    reply: Mapped[Reply] = relationship(back_populates="answers")


class Rating(Base):
    __tablename__ = "ratings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    reply_id: Mapped[str] = mapped_column(ForeignKey("replies.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    rating: Mapped[int] = mapped_column(Integer)  # +1 thumbs up, -1 thumbs down
    comment: Mapped[str | None] = mapped_column(Text)


class Comparison(Base):
    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=_now)
    reply_id: Mapped[str] = mapped_column(ForeignKey("replies.id", ondelete="CASCADE"), index=True)
    chosen: Mapped[int] = mapped_column(Integer)    # answer index preferred
    rejected: Mapped[int] = mapped_column(Integer)  # the other one shown


def sqlite_url(path: str | Path) -> str:
    return f"sqlite:///{Path(path).expanduser().resolve()}"


class FeedbackStore:
    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # SQLite: several gateway replicas may write the same file; wait for the lock instead of failing.
        args = {"timeout": 30, "check_same_thread": False} if url.startswith("sqlite") else {}
        self.engine = create_engine(url, connect_args=args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)

    def add_reply(self, reply_id: str, *, endpoint: str, model: str, messages: list[dict], answers: list[dict],
                  template: str | None = None, sources: list[dict] | None = None) -> None:
        """`answers`: [{"text", "finish_reason"}] in choice order."""
        with Session(self.engine) as s, s.begin():
            s.add(Reply(id=reply_id, endpoint=endpoint, model=model, template=template, messages=messages,
                        sources=sources, answers=[Answer(index=i, text=a["text"], finish_reason=a.get("finish_reason"))
                                                  for i, a in enumerate(answers)]))

    def _answers(self, s: Session, reply_id: str) -> int:
        reply = s.get(Reply, reply_id)
        if reply is None:
            raise UnknownReply(f"no stored reply has id {reply_id!r} (a reply is stored when its request sets "
                               f"\"store\": true)")
        return len(reply.answers)

    def add_rating(self, reply_id: str, index: int, rating: int, comment: str | None) -> int:
        with Session(self.engine) as s, s.begin():
            n = self._answers(s, reply_id)
            if not 0 <= index < n:
                raise UnknownReply(f"reply {reply_id!r} has {n} answer(s); index {index} does not exist")
            row = Rating(reply_id=reply_id, index=index, rating=rating, comment=comment)
            s.add(row)
            s.flush()
            return row.id

    def add_comparison(self, reply_id: str, chosen: int) -> int:
        with Session(self.engine) as s, s.begin():
            n = self._answers(s, reply_id)
            if n != 2:
                raise UnknownReply(f"reply {reply_id!r} has {n} answer(s); a comparison needs a reply with 2 (n=2)")
            if chosen not in (0, 1):
                raise UnknownReply(f"preferred must be 0 or 1 for reply {reply_id!r}")
            row = Comparison(reply_id=reply_id, chosen=chosen, rejected=1 - chosen)
            s.add(row)
            s.flush()
            return row.id

    def dump(self) -> dict[str, list[dict[str, Any]]]:
        """Everything, as plain dicts (for export and tests)."""
        with Session(self.engine) as s:
            replies = [{"id": r.id, "endpoint": r.endpoint, "model": r.model, "template": r.template,
                        "messages": r.messages, "sources": r.sources, "created_at": r.created_at.isoformat(),
                        "answers": [{"text": a.text, "finish_reason": a.finish_reason} for a in r.answers]}
                       for r in s.scalars(select(Reply).order_by(Reply.created_at))]
            ratings = [{"reply_id": r.reply_id, "index": r.index, "rating": r.rating, "comment": r.comment}
                       for r in s.scalars(select(Rating).order_by(Rating.id))]
            comparisons = [{"reply_id": c.reply_id, "chosen": c.chosen, "rejected": c.rejected}
                           for c in s.scalars(select(Comparison).order_by(Comparison.id))]
        return {"replies": replies, "ratings": ratings, "comparisons": comparisons}


def _sqlite_pragmas(conn, _record) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (export) do not block the gateway's writes
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
