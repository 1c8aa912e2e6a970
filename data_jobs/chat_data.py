"""Stage `chat_data`: instruction and preference datasets for post-training, made from the
cleaned corpus (no instruction data can be downloaded here), plus any user-supplied datasets
and the feedback the serving stage exports.

Made honestly from the corpus, each with a right answer taken from the text itself:
- prose: "Explain <title>." (or another of QUESTION_FORMS) -> the document's opening paragraph; "Continue this passage about
  <title>: <first sentence>" -> the rest of a later paragraph; reading: the document's opening
  passage in the Q&A page's prompt shape (`READ_PROMPT`, the `qa.v2` template) with a question
  about its title -> the passage's first sentence citing it, so the model learns to answer
  from what retrieval gives it. The held-out documents' reading items also go to
  `qa_val.jsonl` (question, reference answer, key span) for the serve stage's check;
- code: "Complete this Python function: <signature + docstring>" -> its real body (`ast`).
Preference pairs: chosen = the right answer; rejected = each of: another document's answer
(wrong topic, from another kind of task when there is one), the answer's words shuffled, the
answer cut off after a third, its last two or three words alone (a fragment: without it the
reward models scored a two-word non-answer high, and DPO and GRPO collapsed onto one, e.g.
`" statement.` for every question) -- one pair per kind, so the reward model learns all three from
every answer (one kind per answer left it 350 pairs, and it overfit). Train/held-out
follows the corpus split of the source document, so no document feeds both.
Records go to jsonl in TRL's conversational prompt-completion and preference forms.
"""

from __future__ import annotations

import ast
import json
import random
import re
import textwrap
from pathlib import Path
from typing import Literal

from pydantic import Field

from cluster.config import StrictModel
from cluster.errors import UserError
from cluster.manifest import atomic_write_text, hash_path
from cluster.stage import Stage, StageContext, StageResult
from data_jobs.chat_records import Problem, load_records, preference_record, sft_record

RejectedKind = Literal["wrong_topic", "shuffled", "truncated", "fragment"]


class ChatDataConfig(StrictModel):
    max_answer_chars: int = Field(default=500, ge=20, description="answers are cut at a sentence/line end below this")
    pairs_per_document: int = Field(default=8, ge=1, description="so one long document does not dominate")
    rejected_kinds: list[RejectedKind] = ["wrong_topic", "shuffled", "truncated", "fragment"]
    max_length: int | None = Field(default=None, ge=16, description="tokens of prompt + answer; default: the shards' seq_len")
    sft_files: list[str] = Field(default_factory=list, description="user SFT data: jsonl/parquet with messages or prompt/completion")
    preference_files: list[str] = Field(default_factory=list, description="user or feedback data: prompt/chosen/rejected")
    read_passage_chars: int = Field(default=500, ge=100, description="the reading task's passage, cut at a sentence end")
    reads_per_document: int = Field(default=6, ge=0, description="reading items per training document (held-out "
                                    "documents give all theirs to qa_val)")
    min_records: int = Field(default=20, ge=1, description="fewer valid train records than this is an error")
    seed: int = 0


# ---------------------------------------------------------------- pairs from the corpus

def _clip(text: str, limit: int) -> str:
    """At most `limit` characters, cut at the last sentence or line end when there is one."""
    text = text.strip()
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"), cut.rfind("\n"))
    return (cut[: end + 1] if end > limit // 3 else cut).strip()


def _paragraphs(text: str) -> list[str]:
    """Blank-line-separated paragraphs with their indentation kept (pydoc indents a definition's
    description); callers strip what they do not need."""
    return [p.rstrip().strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]


def _is_rule(line: str) -> bool:
    """A reStructuredText underline (*** / === / --- / ~~~ / ###)."""
    return bool(line.strip()) and set(line.strip()) <= set("*=-~#")


def _title(paragraphs: list[str]) -> tuple[str, list[str]]:
    """A reStructuredText-style title ('The "assert" statement' over a *** line) or the first line."""
    first = paragraphs[0].splitlines()
    if len(first) >= 2 and _is_rule(first[1]):
        rest = ["\n".join(first[2:])] if len(first) > 2 else []
        return first[0].strip(), rest + paragraphs[1:]
    title = first[0].lstrip("# ").strip()
    return title[:80], paragraphs if len(first) > 1 or len(paragraphs) == 1 else paragraphs[1:]


# The Q&A page's user message (serve/prompts/qa.v2.yaml renders the same text with numbered passages).
READ_PROMPT = "Passages:\n{passages}\n\nQuestion: {question}"
QUESTION_FORMS = ("What is {t}?", "What does {t} do?", "Explain {t}.", "Tell me about {t}.", "How does {t} work?")
KEY_SPAN_WORDS = 8


def numbered(passages: list[tuple[str, str]]) -> list[str]:
    """`[n] title: text` for each (title, text), numbered from 1: how READ_PROMPT lists passages,
    in the reading task here and in the Q&A route's prompt (`POST /v1/qa`)."""
    return [f"[{n}] {title}: {text}" for n, (title, text) in enumerate(passages, 1)]


def _is_heading(paragraph: str) -> bool:
    lines = paragraph.strip("\n").splitlines()
    return len(lines) == 2 and _is_rule(lines[1])


def reading_topics(paragraphs: list[str]) -> list[tuple[str, list[str]]]:
    """(topic, its paragraphs) for each section under a reST heading and each definition-list
    entry (a one-line, unindented paragraph followed by indented ones, as pydoc writes
    `object.__getattr__(self, name)` over its description); the passage starts with them."""
    topics: list[tuple[str, list[str]]] = []
    for i, p in enumerate(paragraphs):
        if _is_heading(p):
            body = []
            for q in paragraphs[i + 1:]:
                if _is_heading(q):
                    break
                body.append(q)
            topics.append((p.splitlines()[0].strip(), body))
        elif "\n" not in p.strip() and not p.startswith(" ") and len(p) <= 80 and i + 1 < len(paragraphs) \
                and paragraphs[i + 1].startswith("   "):
            body = []
            for q in paragraphs[i + 1:]:
                if not q.startswith("   "):
                    break
                body.append(textwrap.dedent(q))
            topics.append((p.strip(), body))
    return topics


def _readable(sentence: str, cfg: ChatDataConfig) -> bool:
    """A prose sentence, not a grammar rule or code."""
    words = sentence.split()
    return (len(words) >= 5 and len(sentence) <= cfg.max_answer_chars and "::=" not in sentence
            and sum(w.strip(".,;:()\"'").isalpha() for w in words) >= 0.6 * len(words))


def _subject(topic: str) -> str:
    """A title as the object of a question: 'The "for" statement' -> 'the "for" statement'."""
    return topic[0].lower() + topic[1:] if topic.startswith(("The ", "A ", "An ")) else topic


def read_pair(title: str, topic: str, body: list[str], cfg: ChatDataConfig, rng: random.Random) -> dict[str, str] | None:
    """A question about `topic` over the passage that opens with it (in the Q&A page's shape,
    under the document's `title` as the retriever labels it); the answer is its first sentence."""
    body = [b.strip() for b in body if b.strip()]
    if not body:
        return None
    first = re.split(r"(?<=[.!?])\s+", body[0], maxsplit=1)[0].strip()
    lead = [] if topic == title else [topic]  # a definition's passage starts with its own line
    passage = _clip("\n\n".join(lead + body), cfg.read_passage_chars)
    if not _readable(first, cfg) or first not in passage:
        return None
    question = rng.choice(QUESTION_FORMS).format(t=_subject(topic))
    return {"task": "read", "prompt": READ_PROMPT.format(passages=numbered([(title, passage)])[0], question=question),
            "answer": f"{first} [1]", "question": question, "key_span": " ".join(first.split()[:KEY_SPAN_WORDS])}


def prose_pairs(text: str, cfg: ChatDataConfig, rng: random.Random | None = None) -> list[dict[str, str]]:
    indented = _paragraphs(text)
    paragraphs = [p.strip() for p in indented]
    if not paragraphs:
        return []
    title, body = _title(paragraphs)
    body = [p for p in body if len(p) >= 80]
    pairs = []
    rng = rng or random.Random(cfg.seed)
    if body:  # asked the ways people ask ("What does the "for" statement do?"), not one fixed phrasing
        pairs.append({"task": "explain", "prompt": rng.choice(QUESTION_FORMS).format(t=_subject(title)),
                      "answer": _clip(body[0], cfg.max_answer_chars)})
    for topic, section in [(title, body)] + [t for t in reading_topics(indented) if t[0] != title]:
        read = read_pair(title, topic, section, cfg, rng)
        if read:
            pairs.append(read)
    for p in body[1:]:
        sentences = re.split(r"(?<=[.!?:])\s+", p, maxsplit=1)
        if len(sentences) == 2 and len(sentences[1]) >= 60:
            pairs.append({"task": "continue",
                          "prompt": f"Continue this passage about {title}:\n{sentences[0]}",
                          "answer": _clip(sentences[1], cfg.max_answer_chars)})
    return pairs


def code_pairs(text: str, cfg: ChatDataConfig) -> list[dict[str, str]]:
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines()
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(node.body) < 2:
            continue
        has_doc = ast.get_docstring(node) is not None
        head_end = node.body[1].lineno - 1 if has_doc else node.body[0].lineno - 1
        head = textwrap.dedent("\n".join(lines[node.lineno - 1 - len(node.decorator_list): head_end]))
        body = textwrap.dedent("\n".join(lines[head_end: node.end_lineno]))
        if not body.strip() or len(body) > cfg.max_answer_chars or len(head) > cfg.max_answer_chars:
            continue
        pairs.append({"task": "complete_function", "prompt": f"Complete this Python function:\n{head}",
                      "answer": body.rstrip()})
    return pairs


def _rejected(kind: str, pair: dict, pool: list[dict], rng: random.Random) -> str | None:
    answer = pair["answer"]
    if kind == "wrong_topic":  # another document's answer, to another kind of task when there is one
        others = [p for p in pool if p["doc_id"] != pair["doc_id"]]
        unlike = [p for p in others if p["task"] != pair["task"]]
        return rng.choice(unlike or others)["answer"] if others else None
    if kind == "shuffled":
        words = answer.split()
        if len(words) < 6:
            return None
        for _ in range(5):
            rng.shuffle(words)
            text = " ".join(words)
            if text != " ".join(answer.split()):
                return text
        return None
    if kind == "fragment":  # two or three words that say nothing, as a collapsed policy answers
        words = answer.split()
        return " ".join(words[-rng.randint(2, 3):]) if len(words) >= 8 else None
    words = answer.split(" ")  # truncated: cut after a third, mid-thought
    return " ".join(words[: max(1, len(words) // 3)]) if len(words) >= 6 else None


def corpus_pairs(documents: list[dict], cfg: ChatDataConfig) -> dict[str, list[dict]]:
    """SFT and preference records per split ("train"/"val") from cleaned documents."""
    rng = random.Random(cfg.seed)
    by_split: dict[str, list[dict]] = {"train": [], "val": []}
    for doc in sorted(documents, key=lambda d: d["doc_id"]):
        made = code_pairs(doc["text"], cfg) if doc["kind"] == "code" else prose_pairs(doc["text"], cfg, rng)
        read = [p for p in made if p["task"] == "read"]
        rest = [p for p in made if p["task"] != "read"]
        rng.shuffle(rest)
        kept = read if doc["split"] == "val" else read[: cfg.reads_per_document]
        for pair in kept + rest[: cfg.pairs_per_document]:
            by_split[doc["split"]].append({**pair, "doc_id": doc["doc_id"]})
    out: dict[str, list[dict]] = {}
    for split, pairs in by_split.items():
        out[f"sft_{split}"] = [
            {"prompt": [{"role": "user", "content": p["prompt"]}],
             "completion": [{"role": "assistant", "content": p["answer"]}], "task": p["task"], "doc_id": p["doc_id"]}
            for p in pairs
        ]
        prefs = []
        for p in pairs:
            for kind in cfg.rejected_kinds:
                rejected = _rejected(kind, p, pairs, rng)
                if rejected is None or rejected.strip() == p["answer"].strip():
                    continue
                prefs.append({"prompt": [{"role": "user", "content": p["prompt"]}],
                              "chosen": [{"role": "assistant", "content": p["answer"]}],
                              "rejected": [{"role": "assistant", "content": rejected}],
                              "rejected_kind": kind, "task": p["task"], "doc_id": p["doc_id"]})
        out[f"prefs_{split}"] = prefs
    out["qa_val"] = [{"question": p["question"], "reference": p["answer"].removesuffix(" [1]"),
                      "key_span": p["key_span"], "doc_id": p["doc_id"]} for p in by_split["val"] if p["task"] == "read"]
    return out


# ---------------------------------------------------------------- the stage

def length_check(tokenizer, max_length: int):
    """A record's templated prompt + answer must fit the model's context."""

    def fits(record: dict) -> str | None:
        prompt = tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        answers = [record[k][0]["content"] for k in ("completion", "chosen", "rejected") if k in record]
        n_answer = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
        if n_prompt + n_answer + 1 > max_length:
            return f"prompt ({n_prompt} tokens) + answer ({n_answer} tokens) exceed the context of {max_length} tokens"
        return None

    return fits


def _split_of(record: dict) -> str:
    """User records have no source document: split by a hash of the prompt, 1 in 10 held out."""
    import xxhash

    return "val" if xxhash.xxh64_intdigest(json.dumps(record["prompt"], sort_keys=True).encode()) % 10 == 0 else "train"


def _write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def outside_inputs(ctx: StageContext, cfg: ChatDataConfig) -> dict[str, str]:
    return {f: hash_path(Path(f)) for f in [*cfg.sft_files, *cfg.preference_files] if Path(f).exists()}


def run(ctx: StageContext, cfg: ChatDataConfig) -> StageResult:
    import pyarrow.dataset as pads
    from transformers import AutoTokenizer

    documents_dir = ctx.upstream_output("data", "documents")
    index = json.loads(ctx.upstream_output("tokenizer", "index").read_text())
    tokenizer = AutoTokenizer.from_pretrained(index["tokenizer"])
    max_length = cfg.max_length or index["seq_len"]
    table = pads.dataset(str(documents_dir), format="parquet").to_table(columns=["doc_id", "kind", "text", "split"])
    datasets = corpus_pairs(table.to_pylist(), cfg)
    qa_val = datasets.pop("qa_val")

    fits = length_check(tokenizer, max_length)
    problems: list[Problem] = []
    too_long = {}
    for name in list(datasets):  # corpus pairs obey the same length rule, counted as dropped
        before = len(datasets[name])
        datasets[name] = [r for r in datasets[name] if fits(r) is None]
        too_long[name] = before - len(datasets[name])
    for kind, files, parse in (("sft", cfg.sft_files, sft_record), ("prefs", cfg.preference_files, preference_record)):
        for f in files:
            try:
                records = load_records(Path(f), parse, fits, problems)
            except FileNotFoundError as e:
                raise UserError(f"chat_data: {e}") from None
            for r in records:
                r.update(task="user", doc_id=f)
                datasets[f"{kind}_{_split_of(r)}"].append(r)

    for name in ("sft_train", "prefs_train"):
        if len(datasets[name]) < cfg.min_records:
            raise UserError(
                f"chat_data: only {len(datasets[name])} valid {name} records (chat_data.min_records is "
                f"{cfg.min_records}); {len(problems)} records were rejected, see the problems listed above"
                + "".join(f"\n  {p.source}[{p.index}]: {p.reason}" for p in problems[:10])
            )
    outputs = {}
    for name, records in datasets.items():
        _write_jsonl(ctx.stage_dir / f"{name}.jsonl", records)
        outputs[name] = ctx.stage_dir / f"{name}.jsonl"
    _write_jsonl(ctx.stage_dir / "qa_val.jsonl", qa_val)
    outputs["qa_val"] = ctx.stage_dir / "qa_val.jsonl"
    _write_jsonl(ctx.stage_dir / "problems.jsonl", [p.as_dict() for p in problems])
    for p in problems[:20]:
        print(f"aero: chat_data: skipped {p.source}[{p.index}]: {p.reason}", flush=True)
    stats = {
        **{f"{name}_records": len(r) for name, r in datasets.items()}, "qa_val_records": len(qa_val),
        "rejected_records": len(problems), "corpus_pairs_too_long": too_long, "max_length": max_length,
        "rejected_kinds": {k: sum(r.get("rejected_kind") == k for r in datasets["prefs_train"]) for k in cfg.rejected_kinds},
        "tasks": {t: sum(r["task"] == t for r in datasets["sft_train"]) for t in {r["task"] for r in datasets["sft_train"]}},
    }
    atomic_write_text(ctx.stage_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    outputs.update(problems=ctx.stage_dir / "problems.jsonl", stats=ctx.stage_dir / "stats.json")
    return StageResult(outputs=outputs, metrics={k: v for k, v in stats.items() if isinstance(v, int)})


STAGE = Stage(
    name="chat_data",
    config_model=ChatDataConfig,
    run=run,
    needs=("data", "tokenizer"),
    outside_inputs=outside_inputs,
    description="instruction and preference datasets from the corpus and user files",
)
