"""What a user of the endpoint sees, checked by the serve stage once the app is up, through
its real HTTP routes (the same ones the chat and Q&A pages call):

- the chat model's greedy answers to the demo's questions, with the served sampling defaults,
  measured for degeneration (distinct-1/2, repeated 4-grams, answers ending in a loop;
  `jobs/text_quality.py`);
- the Q&A route's answers to held-out reading items (chat_data's `qa_val.jsonl`: a question
  about a document the models never trained on, and the key span of its reference answer):
  the share whose answer contains the key span, and the share that came with the passages
  they used (the page lists them).

Results go to the stage's `check.json`, `check.md` and manifest; the figures are informational
(a tiny CPU model is not fluent), so the stage never fails on them, nor on a refused or
failed request (counted in `errors`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from cluster.config import StrictModel
from cluster.records import jsonl_objects

DEMO_QUESTIONS = [
    "What does the for statement do?",
    "Explain the assert statement.",
    "What is the while statement?",
    "What does the return statement do?",
    "Explain the with statement.",
    "What does the pass statement do?",
    "What is the import statement?",
    "Tell me about the if statement.",
]


class DemoCheckConfig(StrictModel):
    enabled: bool = True
    model: str | None = Field(default=None, description="the model asked the questions (default: the first served)")
    questions: list[str] = Field(default_factory=lambda: list(DEMO_QUESTIONS), min_length=1)
    max_tokens: int = Field(default=48, ge=1)
    qa_items: str | None = Field(default="chat_data", description="held-out reading items: the chat_data stage (its "
                                 "qa_val output) or a JSONL of {question, key_span}; none: no Q&A check")
    max_qa_items: int = Field(default=40, ge=1)


def contains_span(answer: str, span: str) -> bool:
    """Whitespace- and case-insensitive containment."""
    return " ".join(span.lower().split()) in " ".join(answer.lower().split())


def load_qa_items(path: Path, limit: int) -> list[dict]:
    """The first `limit` items; each needs a non-empty question and key span."""
    from cluster.errors import UserError

    items = []
    for n, row in jsonl_objects(path):
        if not all(isinstance(row.get(k), str) and row[k].strip() for k in ("question", "key_span")):
            raise UserError(f"{path}:{n}: a Q&A check item needs non-empty `question` and `key_span` strings")
        items.append(row)
    return items[:limit]


def run_check(url: str, key: str | None, cfg: DemoCheckConfig, model: str, qa_items: list[dict],
              timeout_s: float = 120) -> dict[str, Any]:
    import httpx

    from jobs.text_quality import degeneration

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    errors: list[str] = []
    with httpx.Client(base_url=url, headers=headers, timeout=timeout_s) as client:
        def post(route: str, body: dict) -> dict | None:
            """The reply, or None with the error kept (a refusal or a timeout is something a
            user would see too; it must not fail the stage that deployed the app)."""
            try:
                reply = client.post(route, json=body)
            except httpx.HTTPError as exc:
                errors.append(f"{route}: {type(exc).__name__}: {exc}")
                return None
            if reply.status_code != 200:
                errors.append(f"{route} answered {reply.status_code}: {reply.text[:300]}")
                return None
            return reply.json()

        answers = []
        for q in cfg.questions:
            reply = post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": q}],
                                                  "max_tokens": cfg.max_tokens, "temperature": 0})
            answers.append((reply["choices"][0]["message"]["content"] or "") if reply else "")
        result: dict[str, Any] = {"chat": {"model": model, "questions": len(answers), **degeneration(answers),
                                           "answers": [{"question": q, "answer": a} for q, a in zip(cfg.questions, answers)]}}
        if qa_items:
            hits, with_sources, samples = 0, 0, []
            for item in qa_items:
                reply = post("/v1/qa", {"question": item["question"], "temperature": 0}) or {"answer": "", "sources": []}
                hit = contains_span(reply["answer"], item["key_span"])
                hits += hit
                with_sources += bool(reply["sources"]) and all(s.get("text") for s in reply["sources"])
                samples.append({"question": item["question"], "key_span": item["key_span"], "answer": reply["answer"],
                                "contains_key_span": hit, "sources": [s["title"] for s in reply["sources"]]})
            result["qa"] = {"items": len(qa_items), "key_span_share": hits / len(qa_items),
                            "with_sources_share": with_sources / len(qa_items), "answers": samples}
    result["errors"] = errors
    return result


def markdown(result: dict[str, Any]) -> str:
    """check.md: the figures, then every answer, as the run report shows them."""
    chat = result["chat"]
    lines = [f"Greedy answers of `{chat['model']}` to {chat['questions']} demo questions (served sampling defaults): "
             f"distinct-2 **{chat['distinct_2']:.3f}**, repeated 4-grams **{chat['repeated_4gram_share']:.3f}**, "
             f"ending in a loop **{chat['loop_share']:.3f}**.", ""]
    lines += [f"- *{a['question']}* → {' '.join(a['answer'].split()) or '(empty)'}" for a in chat["answers"]]
    if "qa" in result:
        qa = result["qa"]
        lines += ["", f"Q&A on {qa['items']} held-out items: the answer holds the reference's key span in "
                  f"**{qa['key_span_share']:.3f}**; the reply listed the passages it used in "
                  f"**{qa['with_sources_share']:.3f}**.", ""]
        lines += [f"- {'✓' if a['contains_key_span'] else '✗'} *{a['question']}* → {' '.join(a['answer'].split()) or '(empty)'}"
                  f" (key span: {a['key_span']}; passages: {', '.join(a['sources'])})" for a in qa["answers"][:12]]
    if result["errors"]:
        lines += ["", f"{len(result['errors'])} requests failed:"] + [f"- {e}" for e in result["errors"][:10]]
    return "\n".join(lines) + "\n"


def summary(result: dict[str, Any]) -> dict[str, float]:
    """The manifest's figures."""
    chat = result["chat"]
    out = {f"demo_{k}": chat[k] for k in ("distinct_2", "repeated_4gram_share", "loop_share")}
    out["check_errors"] = len(result["errors"])
    if "qa" in result:
        out.update(qa_key_span_share=result["qa"]["key_span_share"], qa_with_sources_share=result["qa"]["with_sources_share"])
    return out
