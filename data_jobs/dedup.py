"""Global dedup over the cleaned parts, the Ray way, in one hash shuffle: each document
emits one row keyed by its exact text hash and one per MinHash band; Ray Data groups the
keys; exact groups give exact-duplicate pairs, band buckets give near-duplicate candidates
(checked against the bucket's first member's signature). Pairs are joined into clusters
with union-find in the driver: only document ids and duplicate pairs reach it, never the
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
    keys, kinds, ids, sigs = [], [], [], []
    for doc_id, text_hash, sig_bytes in zip(batch["doc_id"], batch["text_hash"], batch["signature"]):
        if dedup.exact:
            keys.append(xxhash.xxh3_64_intdigest(text_hash.encode(), seed=1 << 20))
            kinds.append(EXACT)
            ids.append(doc_id)
            sigs.append(b"")
        if dedup.near:
            for key in band_keys(np.frombuffer(sig_bytes, dtype=np.uint32), dedup):
                keys.append(key)
                kinds.append(NEAR)
                ids.append(doc_id)
                sigs.append(sig_bytes)
    return pd.DataFrame(
        {"key": np.array(keys, dtype=np.uint64), "kind": np.array(kinds, dtype=np.int8), "doc_id": ids, "signature": sigs}
    )


def _group_pairs(group: pd.DataFrame, threshold: float) -> pd.DataFrame:
    pairs = []
    for kind, members in group.groupby("kind"):
        if len(members) < 2:
            continue
        members = members.sort_values("doc_id")
        ids = list(members["doc_id"])
        if kind == EXACT:
            pairs += [(ids[0], other, EXACT) for other in ids[1:]]
        else:
            sigs = [np.frombuffer(s, dtype=np.uint32) for s in members["signature"]]
            pairs += [
                (ids[0], ids[i], NEAR) for i in range(1, len(ids)) if estimated_jaccard(sigs[0], sigs[i]) >= threshold
            ]
    return pd.DataFrame(pairs, columns=["a", "b", "kind"]).astype({"a": object, "b": object, "kind": np.int8})


def find_duplicates(kept, cfg: DedupConfig, partitions: int) -> pd.DataFrame:
    """`kept`: a Ray Dataset of (doc_id, text_hash, signature) rows. Returns the documents to
    drop: doc_id, kept (the survivor of its cluster), dedup ('exact' or 'near')."""
    columns = ["doc_id", "kept", "dedup"]
    if not (cfg.exact or cfg.near):
        return pd.DataFrame(columns=columns)
    pairs = (
        kept.map_batches(_key_rows, batch_format="pandas", fn_kwargs={"cfg": cfg.model_dump()})
        .groupby("key", num_partitions=partitions)
        .map_groups(_group_pairs, batch_format="pandas", fn_kwargs={"threshold": cfg.threshold})
        .to_pandas()
        .reindex(columns=["a", "b", "kind"])
    )
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
