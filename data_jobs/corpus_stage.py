"""Stage `data`: sources -> cleaned, deduplicated, PII-scrubbed documents with a train/val
split, on Ray Data.

Phases, each written to the stage folder so a killed run resumes where it stopped:
1. clean (per part of ~part_bytes of input; a finished part has a `_DONE` marker and is
   not redone): read, normalize, filter, scrub, hash and sign (data_jobs/clean.py);
2. dedup over all parts (data_jobs/dedup.py);
3. write `documents/` (parquet), `rejects/` (JSON lines: every removed record and why),
   `stats.json` (the funnel) and `funnel.png`.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import xxhash
from pydantic import Field

from cluster.config import CustomResources, StrictModel
from cluster.manifest import atomic_write_text
from cluster.stage import Stage, StageContext, StageResult
from data_jobs.minhash import DedupConfig
from data_jobs.pii import PiiConfig
from data_jobs.quality import QualityConfig
from data_jobs.sources import SourceFile, resolve_source

FUNNEL_STEPS = [
    "ingest", "normalize", "language", "code", "c4", "gopher_quality", "gopher_repetition", "dedup_exact", "dedup_near",
]
DOC_COLUMNS = ["doc_id", "source", "kind", "language", "text", "n_bytes", "split"]


class CorpusConfig(StrictModel):
    sources: list[str] = Field(default_factory=lambda: ["stdlib:docs", "data_jobs/samples"], min_length=1)
    text_field: str = "text"
    max_doc_chars: int = Field(default=1_000_000, ge=1)
    part_bytes: int = Field(default=32 << 20, ge=1, description="input bytes per resumable part")
    blocks_per_part: int = Field(default=8, ge=1)
    task_resources: CustomResources = Field(default_factory=dict, description="custom Ray resources each cleaning "
                                            "task asks for, e.g. one that only the CPU worker pool offers, to keep "
                                            "cleaning off the head")
    shuffle_partitions: int = Field(default=4, ge=1, description="hash partitions of the dedup groupbys")
    val_fraction: float = Field(default=0.05, ge=0, lt=0.5, description="share of documents held out, by content hash")
    quality: QualityConfig = QualityConfig()
    dedup: DedupConfig = DedupConfig()
    pii: PiiConfig = PiiConfig()


def _source_files(ctx: StageContext, config: CorpusConfig):
    staging = ctx.run_dir / "_staged"
    return [resolve_source(spec, staging) for spec in config.sources]


def outside_inputs(ctx: StageContext, config: CorpusConfig) -> dict[str, str]:
    return {f"source:{s.spec}": s.digest() for s in _source_files(ctx, config)}


def partition(files: list[SourceFile], part_bytes: int) -> list[list[SourceFile]]:
    """Consecutive groups of files of about `part_bytes` each (a bigger file is a part alone)."""
    parts: list[list[SourceFile]] = [[]]
    size = 0
    for f in files:
        if parts[-1] and size + f.size > part_bytes:
            parts.append([])
            size = 0
        parts[-1].append(f)
        size += f.size
    return [p for p in parts if p]


def write_fresh(target: Path, write) -> Path:
    """Write a Ray Data output folder through a temp folder, so a rerun never mixes old and new files."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    tmp.mkdir(parents=True, exist_ok=True)  # an empty dataset writes no folder at all
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def split_of(text_hash: str, val_fraction: float) -> str:
    """train/val by the document's content hash: stable wherever the run folder lives (doc_ids
    of staged sources contain its path), and exact copies can never straddle the split."""
    return "val" if xxhash.xxh64_intdigest(text_hash.encode()) % 10_000 < val_fraction * 10_000 else "train"


def _finalize(batch, drop: set, val_fraction: float):
    batch = batch[~batch["doc_id"].isin(drop)]
    batch = batch.assign(split=[split_of(h, val_fraction) for h in batch["text_hash"]])
    return batch[DOC_COLUMNS]


def _accounting(batch, dedup_kind: dict, val_fraction: float):
    """Per-batch counters for stats.json, from the same rows the filters wrote: documents and
    input bytes removed by each step (dedup included), PII replacements, and what is kept."""
    import pandas as pd

    c: Counter = Counter()
    c["docs:all"] += len(batch)
    for doc_id, step, n_in, n_out, pii, kind, language, text_hash in zip(
        batch["doc_id"], batch["step"], batch["n_bytes_in"], batch["n_bytes"], batch["pii"], batch["kind"],
        batch["language"], batch["text_hash"],
    ):
        if step == "" and doc_id in dedup_kind:
            step = f"dedup_{dedup_kind[doc_id]}"
        if step:
            c[f"docs:{step}"] += 1
            c[f"bytes:{step}"] += int(n_in)
            continue
        c["docs:out"] += 1
        c["bytes:out"] += int(n_out)
        c[f"split:{split_of(text_hash, val_fraction)}"] += 1
        c[f"kind:{kind}"] += 1
        c[f"language:{language or kind}"] += 1
        if pii:
            c.update({f"pii:{k}": v for k, v in json.loads(pii).items()})
    return pd.DataFrame({"counter": list(c), "value": list(c.values())})


def _clean_parts(ctx: StageContext, config: CorpusConfig, files: list[SourceFile]) -> Path:
    import ray.data

    from data_jobs.clean import clean_files

    parts_dir, done_dir = ctx.stage_dir / "parts", ctx.stage_dir / "parts_done"
    done_dir.mkdir(parents=True, exist_ok=True)
    plan = partition(files, config.part_bytes)
    for i, part in enumerate(plan):
        out = parts_dir / f"part-{i:05d}"
        marker = done_dir / out.name
        if marker.exists() and out.is_dir():
            print(f"aero: data: part {i + 1}/{len(plan)} already cleaned; kept", flush=True)
            continue
        print(f"aero: data: cleaning part {i + 1}/{len(plan)} ({len(part)} files)", flush=True)
        items = [{"path": f.path, "size": f.size} for f in part]
        cleaned = ray.data.from_items(items, override_num_blocks=min(len(items), config.blocks_per_part)).map_batches(
            clean_files,
            batch_size=4,
            batch_format="pandas",
            resources=config.task_resources or None,
            fn_kwargs={
                "text_field": config.text_field, "max_doc_chars": config.max_doc_chars,
                "quality": config.quality.model_dump(), "pii": config.pii.model_dump(),
                "dedup": config.dedup.model_dump(),
            },
        )
        write_fresh(out, cleaned.write_parquet)
        marker.write_text(json.dumps([f.path for f in part]))
    return parts_dir


def run(ctx: StageContext, config: CorpusConfig) -> StageResult:
    import ray.data
    from ray.data.expressions import col

    from data_jobs.dedup import find_duplicates
    from data_jobs.funnel import plot_funnel

    sources = _source_files(ctx, config)
    files = [f for s in sources for f in s.files]
    listing = [{"spec": s.spec, "files": [f.path for f in s.files]} for s in sources]  # hashes: manifest inputs
    atomic_write_text(ctx.stage_dir / "sources.json", json.dumps(listing, indent=2) + "\n")

    parts_dir = _clean_parts(ctx, config, files)
    rows = ray.data.read_parquet(str(parts_dir), file_extensions=["parquet"])
    kept = rows.filter(expr=col("reason") == "")

    duplicates = find_duplicates(kept, config.dedup, config.shuffle_partitions)
    (ctx.stage_dir / "dedup").mkdir(exist_ok=True)
    duplicates.to_parquet(ctx.stage_dir / "dedup" / "duplicates.parquet", index=False)
    drop = set(duplicates["doc_id"])

    documents = kept.map_batches(
        _finalize, batch_format="pandas", fn_kwargs={"drop": drop, "val_fraction": config.val_fraction}
    )
    documents_dir = write_fresh(ctx.stage_dir / "documents", documents.write_parquet)

    dedup_rejects = ray.data.from_pandas(
        duplicates.assign(
            source=duplicates["doc_id"], step="dedup_" + duplicates["dedup"],
            reason=[f"{d} duplicate of {k}" for d, k in zip(duplicates["dedup"], duplicates["kept"])],
        )[["doc_id", "source", "step", "reason"]]
    )
    rejects = rows.filter(expr=col("reason") != "").select_columns(["doc_id", "source", "step", "reason"])
    rejects_dir = write_fresh(ctx.stage_dir / "rejects", rejects.union(dedup_rejects).write_json)

    totals = rows.map_batches(
        _accounting, batch_format="pandas",
        fn_kwargs={"dedup_kind": dict(zip(duplicates["doc_id"], duplicates["dedup"])), "val_fraction": config.val_fraction},
    ).to_pandas()  # one small row per (batch, counter)
    counts = totals.groupby("counter")["value"].sum()
    by_step = {
        step: (int(counts.get(f"docs:{step}", 0)), int(counts.get(f"bytes:{step}", 0))) for step in FUNNEL_STEPS
    }
    docs_in = int(counts.get("docs:all", 0))
    bytes_in = sum(f.size for f in files)
    funnel = [{"step": "input", "documents_left": docs_in, "bytes_left": bytes_in}]
    left_docs, left_bytes = docs_in, bytes_in
    removed = {}
    for step in FUNNEL_STEPS:
        n, b = by_step[step]
        removed[step] = n
        left_docs, left_bytes = left_docs - n, max(left_bytes - b, 0)
        funnel.append({"step": step, "documents_left": left_docs, "bytes_left": left_bytes})

    def group(prefix: str) -> dict[str, int]:
        return {k[len(prefix):]: int(v) for k, v in counts.items() if k.startswith(prefix) and v}

    stats = {
        "files_in": len(files),
        "bytes_in": bytes_in,
        "documents_in": docs_in,
        "removed": removed,
        "rejected_total": sum(removed.values()),
        "pii_replaced": group("pii:"),
        "documents_out": int(counts.get("docs:out", 0)),
        "bytes_out": int(counts.get("bytes:out", 0)),
        "documents_by_split": group("split:"),
        "documents_by_kind": group("kind:"),
        "documents_by_language": group("language:"),
        "funnel": funnel,
    }
    if stats["documents_out"] != left_docs:
        raise RuntimeError(f"data funnel does not add up: {left_docs} left by the funnel, {stats['documents_out']} written")
    atomic_write_text(ctx.stage_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    plot_funnel(funnel, ctx.stage_dir / "funnel.png", f"data funnel: run {ctx.run}")
    print(
        f"aero: data: {stats['documents_out']} documents kept of {docs_in}, "
        f"{stats['rejected_total']} removed (see rejects/), PII replaced {stats['pii_replaced']}",
        flush=True,
    )
    return StageResult(
        outputs={
            "documents": documents_dir, "rejects": rejects_dir, "stats": ctx.stage_dir / "stats.json",
            "funnel": ctx.stage_dir / "funnel.png",
        },
        metrics={k: stats[k] for k in ("files_in", "bytes_in", "documents_in", "documents_out", "bytes_out",
                                       "rejected_total", "documents_by_split", "documents_by_kind")},
    )


STAGE = Stage(
    name="data",
    config_model=CorpusConfig,
    run=run,
    outside_inputs=outside_inputs,
    description="clean, filter, dedup and scrub the corpus with Ray Data",
)
