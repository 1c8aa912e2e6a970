"""The per-batch cleaning step of stage `data`, for `map_batches`: read files, normalize,
filter (quality, language, code profile), scrub PII, and compute each kept document's
exact hash and MinHash signature for the global dedup that follows.

Output rows keep every input accounted for: kept documents have `reason == ""`; every
other row says which step removed it (`step`) and why (`reason`).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import xxhash

from data_jobs.documents import normalize_text, raw_documents
from data_jobs.minhash import DedupConfig, permutations, signature
from data_jobs.pii import PiiConfig, scrub_pii
from data_jobs.quality import (
    QualityConfig,
    c4_rules,
    code_rules,
    gopher_quality,
    gopher_repetition,
    identify_language,
    language_rule,
)
from data_jobs.text_stats import words_and_hashes

COLUMNS = [
    "doc_id", "source", "kind", "language", "text", "n_bytes", "n_bytes_in", "step", "reason",
    "pii", "text_hash", "signature",
]


def _quality(text: str, kind: str, language: str, cfg: QualityConfig):
    """(reason or None, step, language, text possibly edited by C4's line rules, word hashes)."""
    if kind == "code":
        if cfg.code.enabled and (reason := code_rules(text, cfg.code)):
            return reason, "code", language, text, None
        return None, "", language, text, None
    if cfg.language.enabled:
        language, confidence = identify_language(text, cfg.language.max_chars)
        if reason := language_rule(language, confidence, cfg.language):
            return reason, "language", language, text, None
    if cfg.c4.enabled:
        reason, text = c4_rules(text, cfg.c4)
        if reason:
            return reason, "c4", language, text, None
    if cfg.gopher_quality.enabled:
        reason = gopher_quality(text, text.lower().split(), language, cfg.gopher_quality)
        if reason:
            return reason, "gopher_quality", language, text, None
    hashes, lengths = words_and_hashes(text)
    if cfg.gopher_repetition.enabled:
        if reason := gopher_repetition(text, hashes, lengths, cfg.gopher_repetition):
            return reason, "gopher_repetition", language, text, None
    return None, "", language, text, hashes


def clean_files(
    batch: pd.DataFrame, *, text_field: str, max_doc_chars: int, quality: dict, pii: dict, dedup: dict
) -> pd.DataFrame:
    quality_cfg, pii_cfg, dedup_cfg = QualityConfig(**quality), PiiConfig(**pii), DedupConfig(**dedup)
    perms = permutations(dedup_cfg.num_perm, dedup_cfg.seed)
    rows = []

    for path, size in zip(batch["path"], batch["size"]):

        def reject(doc_id: str, step: str, reason: str, n_bytes_in: int, kind: str = "", language: str = "") -> None:
            rows.append((doc_id, path, kind, language, "", 0, n_bytes_in, step, reason, "", "", b""))

        for doc_id, kind, language, raw, reason in raw_documents(path, int(size), text_field, max_doc_chars):
            if reason is not None:
                reject(doc_id, "ingest", reason, int(size) if doc_id == path else 0)
                continue
            n_in = len(raw.encode("utf-8", errors="replace"))
            if len(raw) > max_doc_chars:
                reject(doc_id, "ingest", f"ingest: {len(raw)} characters > max_doc_chars {max_doc_chars}", n_in, kind)
                continue
            text = normalize_text(raw)
            if not text:
                reject(doc_id, "normalize", "normalize: empty after normalization", n_in, kind)
                continue
            reason, step, language, text, hashes = _quality(text, kind, language, quality_cfg)
            if reason:
                reject(doc_id, step, reason, n_in, kind, language)
                continue
            if dedup_cfg.near:
                # Signed before PII scrubbing: copies that differ only in an address are still copies.
                hashes = words_and_hashes(text)[0] if hashes is None else hashes
                sig = signature(hashes, dedup_cfg, perms)
            else:
                sig = np.zeros(0, np.uint32)
            text, counts = scrub_pii(text, pii_cfg)
            rows.append((
                doc_id, path, kind, language,
                text, len(text.encode("utf-8")), n_in, "", "", json.dumps(dict(counts)) if counts else "",
                xxhash.xxh3_128_hexdigest(text.encode("utf-8")), sig.tobytes(),
            ))
    return pd.DataFrame(rows, columns=COLUMNS)
