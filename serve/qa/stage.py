"""Stage `qa_index`: the passage index that the Q&A page searches, built from the corpus
stage's cleaned documents (or any folder of text files), and its retrieval quality on a
labeled question set (`questions.jsonl`: which topic answers each question).

A question counts as answered at k when one of the top-k passages belongs to its topic: a
document with that title, or a section with that heading (pydoc's "Compound statements"
topic holds the "while" statement's section, so both answer "how do I repeat code?").
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from pydantic import Field

from cluster.config import StrictModel
from cluster.errors import UserError
from cluster.manifest import atomic_write_text, file_hashes
from cluster.records import jsonl_objects
from cluster.stage import Stage, StageContext, StageResult, is_folder_ref

QUESTIONS = Path(__file__).with_name("questions.jsonl")


class QAIndexConfig(StrictModel):
    source: str = Field(default="data", description="a stage name (its `documents` output) or a folder of text files")
    kinds: list[str] = Field(default_factory=lambda: ["prose"],
                             description="document kinds taken from the corpus stage (prose, code)")
    passage_chars: int = Field(default=800, ge=100, le=8000, description="passages are cut at paragraphs up to this")
    questions: str | None = Field(default=None, description="labeled questions JSONL ({question, title}); default: "
                                                            "the shipped set when the source is a stage")
    k: int = Field(default=5, ge=1, le=50, description="recall is measured at this many passages")


def _is_stage(source: str) -> bool:
    return not is_folder_ref(source)


def questions_file(cfg: QAIndexConfig) -> Path | None:
    """The labeled questions to evaluate on: the recipe's, else the shipped set for the corpus."""
    if cfg.questions:
        return Path(cfg.questions).expanduser()
    return QUESTIONS if _is_stage(cfg.source) else None


def documents(ctx: StageContext, cfg: QAIndexConfig) -> list[dict]:
    from serve.qa.index import folder_documents

    if not _is_stage(cfg.source):
        return folder_documents(Path(cfg.source).expanduser())
    import pyarrow.dataset as pads

    folder = ctx.upstream_output(cfg.source, "documents")
    table = pads.dataset(str(folder), format="parquet").to_table(columns=["doc_id", "kind", "text"])
    docs = [d for d in table.to_pylist() if d["kind"] in cfg.kinds]
    if not docs:
        raise UserError(f"qa_index: stage {cfg.source!r} has no documents of kinds {cfg.kinds}")
    return docs


def load_questions(path: Path) -> list[dict]:
    out = []
    for i, q in jsonl_objects(path):
        if not str(q.get("question", "")).strip() or not str(q.get("title", "")).strip():
            raise UserError(f"{path}:{i}: needs a non-empty `question` and `title`")
        out.append(q)
    return out


def evaluate(index, embedder, questions: list[dict], k: int) -> dict:
    """recall@k and MRR over the questions whose topic is in the index (the others are counted)."""
    topics = {p.title for p in index.passages} | {p.section for p in index.passages}
    asked = [q for q in questions if q["title"] in topics]
    if not asked:
        return {"questions": 0, "not_in_index": len(questions)}
    vectors = embedder.encode([q["question"] for q in asked])
    ranks, latency = [], []
    for q, v in zip(asked, vectors):
        t = time.perf_counter()
        hits = index.search(v, k)
        latency.append(time.perf_counter() - t)
        ranks.append(next((r for r, (p, _) in enumerate(hits, 1) if q["title"] in (p.title, p.section)), None))
    found = [r is not None for r in ranks]
    return {"questions": len(asked), "not_in_index": len(questions) - len(asked), "k": k,
            f"recall_at_{k}": round(float(np.mean(found)), 3),
            "recall_at_1": round(float(np.mean([r == 1 for r in ranks])), 3),
            "mrr": round(float(np.mean([1 / r if r else 0 for r in ranks])), 3),
            "search_ms_p95": round(float(np.percentile(np.array(latency) * 1000, 95)), 3),
            "missed": [q["question"] for q, f in zip(asked, found) if not f]}


def run(ctx: StageContext, cfg: QAIndexConfig) -> StageResult:
    from serve.embedder import Embedder
    from serve.qa.index import PassageIndex

    docs = documents(ctx, cfg)
    embedder = Embedder()
    started = time.perf_counter()
    index = PassageIndex.build(docs, embedder, cfg.passage_chars)
    index.meta["build_s"] = round(time.perf_counter() - started, 2)
    index.save(ctx.stage_dir / "index")
    questions = questions_file(cfg)
    ev = {"index": index.meta}
    if questions is not None:
        ev.update(evaluate(index, embedder, load_questions(questions), cfg.k))
    atomic_write_text(ctx.stage_dir / "eval.json", json.dumps(ev, indent=2, ensure_ascii=False) + "\n")
    recall = ev.get(f"recall_at_{cfg.k}")
    print(f"aero: qa_index: {index.meta['passages']} passages from {index.meta['documents']} documents"
          + (f"; recall@{cfg.k} {recall} on {ev['questions']} questions" if recall is not None else ""), flush=True)
    metrics = {"passages": index.meta["passages"], "documents": index.meta["documents"]}
    if recall is not None:
        metrics[f"recall_at_{cfg.k}"] = recall
    return StageResult(outputs={"index": ctx.stage_dir / "index", "eval": ctx.stage_dir / "eval.json"},
                       metrics=metrics)


def _inputs(ctx: StageContext, cfg: QAIndexConfig) -> dict[str, str]:
    path = questions_file(cfg)
    return {**ctx.fingerprints([cfg.source]), **file_hashes([path] if path else [], "qa_index.questions")}


STAGE = Stage(name="qa_index", config_model=QAIndexConfig, run=run, outside_inputs=_inputs,
              description="Q&A retrieval: passages of the corpus embedded with MiniLM, recall@k on labeled questions")
