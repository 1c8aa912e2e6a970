"""Stage `data`: read the recipe's sources with Ray Data into normalized documents
(parquet) plus a rejects file with a reason per rejected record, and a `stats.json` funnel.

This is the first slice of the corpus pipeline; quality filters, dedup, PII scrubbing and
packed token shards extend it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pydantic import Field

from cluster.config import StrictModel
from cluster.manifest import atomic_write_text
from cluster.stage import Stage, StageContext, StageResult
from data_jobs.sources import resolve_source


class CorpusConfig(StrictModel):
    sources: list[str] = Field(default_factory=lambda: ["stdlib:docs", "data_jobs/samples"], min_length=1)
    text_field: str = "text"
    max_doc_chars: int = Field(default=5_000_000, ge=1)
    parallelism: int = Field(default=4, ge=1, description="read/transform blocks")


def _source_files(ctx: StageContext, config: CorpusConfig):
    staging = ctx.run_dir / "_staged"
    return [resolve_source(spec, staging) for spec in config.sources]


def outside_inputs(ctx: StageContext, config: CorpusConfig) -> dict[str, str]:
    return {f"source:{s.spec}": s.digest() for s in _source_files(ctx, config)}


def _write_fresh(target: Path, write) -> Path:
    """Write a Ray Data output folder through a temp folder, so a rerun never mixes old and new files."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(str(tmp))
    tmp.mkdir(exist_ok=True)  # an empty dataset writes no folder at all
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target


def run(ctx: StageContext, config: CorpusConfig) -> StageResult:
    import ray.data

    from data_jobs.documents import documents_from_files

    sources = _source_files(ctx, config)
    files = [str(f) for s in sources for f in s.files]
    listing = [{"spec": s.spec, "files": [str(f) for f in s.files], "sha256": s.digest()} for s in sources]
    atomic_write_text(ctx.stage_dir / "sources.json", json.dumps(listing, indent=2) + "\n")

    raw = ray.data.read_binary_files(files, include_paths=True, override_num_blocks=min(config.parallelism, len(files)))
    rows = raw.map_batches(
        documents_from_files,
        batch_format="pandas",
        fn_kwargs={"text_field": config.text_field, "max_doc_chars": config.max_doc_chars},
    ).materialize()
    docs = rows.filter(lambda r: r["reason"] == "").drop_columns(["reason"])
    rejects = rows.filter(lambda r: r["reason"] != "").select_columns(["source", "reason"])

    documents_dir = _write_fresh(ctx.stage_dir / "documents", docs.write_parquet)
    n_rejects = rejects.count()
    rejects_dir = _write_fresh(ctx.stage_dir / "rejects", rejects.write_json)
    n_docs = docs.count()
    stats = {
        "files_in": len(files),
        "bytes_in": sum(Path(f).stat().st_size for f in files),
        "documents_out": n_docs,
        "bytes_out": int(docs.sum("n_bytes") or 0) if n_docs else 0,
        "rejected": n_rejects,
        "documents_by_kind": {r["kind"]: int(r["count()"]) for r in docs.groupby("kind", num_partitions=1).count().take_all()},
    }
    atomic_write_text(ctx.stage_dir / "stats.json", json.dumps(stats, indent=2) + "\n")
    print(f"aero: data: {stats['documents_out']} documents, {n_rejects} rejected", flush=True)
    return StageResult(
        outputs={"documents": documents_dir, "rejects": rejects_dir, "stats": ctx.stage_dir / "stats.json"},
        metrics=stats,
    )


STAGE = Stage(
    name="data",
    config_model=CorpusConfig,
    run=run,
    outside_inputs=outside_inputs,
    description="read sources into normalized documents with Ray Data",
)
