"""Global dedup over the cleaned parts, the Ray way, in one hash shuffle: each document
emits one (key, doc_id) row for its exact text hash and one per MinHash band; Ray Data
hash-partitions the rows by key; exact groups give exact-duplicate pairs, band buckets give near-duplicate
candidates. Only the candidates' signatures are then fetched (a filter over the parts) to
check their estimated Jaccard, and pairs are joined into clusters with union-find in the
driver: only document ids, duplicate pairs and candidate signatures reach it, never the
corpus. In every cluster the smallest doc_id is kept, so reruns choose the same one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xxhash

from data_jobs.minhash import DedupConfig, UnionFind, band_keys, estimated_jaccard

EXACT, NEAR = 0, 1


def _key_rows(batch: pd.DataFrame, cfg: dict) -> pd.DataFrame:
    dedup = DedupConfig(**cfg)
    keys, kinds, ids = [], [], []
    for doc_id, text_hash, sig_bytes in zip(batch["doc_id"], batch["text_hash"], batch["signature"]):
        if dedup.exact:
            keys.append(xxhash.xxh3_64_intdigest(text_hash.encode(), seed=1 << 20))
            kinds.append(EXACT)
            ids.append(doc_id)
        if dedup.near:
            for key in band_keys(np.frombuffer(sig_bytes, dtype=np.uint32), dedup):
                keys.append(key)
                kinds.append(NEAR)
                ids.append(doc_id)
    return pd.DataFrame({"key": np.array(keys, dtype=np.uint64), "kind": np.array(kinds, dtype=np.int8), "doc_id": ids})


def _partition_pairs(batch: pd.DataFrame) -> pd.DataFrame:
    """Star pairs (smallest id, each other id) of every key shared by more than one document,
    for one hash partition at once (pandas groupby, not one Python call per key)."""
    rows = batch.drop_duplicates(["key", "kind", "doc_id"])
    rows = rows[rows.groupby(["key", "kind"])["doc_id"].transform("size") > 1]
    first = rows.groupby(["key", "kind"])["doc_id"].transform("min")
    pairs = pd.DataFrame({"a": first.to_numpy(), "b": rows["doc_id"].to_numpy(), "kind": rows["kind"].to_numpy()})
    return pairs[pairs["a"] != pairs["b"]].drop_duplicates().astype({"a": object, "b": object, "kind": np.int8})


def find_duplicates(kept, cfg: DedupConfig, partitions: int) -> pd.DataFrame:
    """`kept`: a Ray Dataset of kept rows (doc_id, text_hash, signature among their columns). Returns the documents to
    drop: doc_id, kept (the survivor of its cluster), dedup ('exact' or 'near')."""
    columns = ["doc_id", "kept", "dedup"]
    if not (cfg.exact or cfg.near):
        return pd.DataFrame(columns=columns)
    from ray.data.expressions import col

    pairs = (
        kept.select_columns(["doc_id", "text_hash", "signature"])
        .map_batches(_key_rows, batch_format="pandas", fn_kwargs={"cfg": cfg.model_dump()})
        .repartition(partitions, shuffle=True, keys=["key"])
        .map_batches(_partition_pairs, batch_size=None, batch_format="pandas")
        .to_pandas()
        .reindex(columns=["a", "b", "kind"])
        .drop_duplicates()
    )
    candidates = pairs[pairs["kind"] == NEAR]
    wanted = sorted(set(candidates["a"]) | set(candidates["b"]))
    signatures = {}
    if wanted:
        rows = kept.filter(expr=col("doc_id").is_in(wanted)).select_columns(["doc_id", "signature"]).to_pandas()
        signatures = {d: np.frombuffer(s, dtype=np.uint32) for d, s in zip(rows["doc_id"], rows["signature"])}
    verified = np.array(
        [
            estimated_jaccard(signatures[a], signatures[b]) >= cfg.threshold if k == NEAR else True
            for a, b, k in zip(pairs["a"], pairs["b"], pairs["kind"])
        ],
        dtype=bool,
    )
    pairs = pairs[verified]
    exact, near = UnionFind(), UnionFind()
    for a, b in zip(pairs["a"][pairs["kind"] == EXACT], pairs["b"][pairs["kind"] == EXACT]):
        exact.union(a, b)
    rows = [(d, root, "exact") for root, members in exact.clusters().items() for d in members if d != root]
    for a, b in zip(pairs["a"][pairs["kind"] == NEAR], pairs["b"][pairs["kind"] == NEAR]):
        ra, rb = exact.find(a), exact.find(b)  # exact copies are represented by their survivor
        if ra != rb:
            near.union(ra, rb)
    rows += [(d, root, "near") for root, members in near.clusters().items() for d in members if d != root]
    return pd.DataFrame(rows, columns=columns)
