"""Tokenize and pack, for `map_batches`: each document's ids plus EOS are concatenated and
cut into fixed-length training sequences (the tail of a batch shorter than one sequence is
dropped and counted). Documents never cross the train/val boundary: each split is packed
on its own."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa


@lru_cache(maxsize=2)
def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def pack_ids(id_lists: list[list[int]], eos_id: int, seq_len: int) -> tuple[np.ndarray, int]:
    """(sequences [n, seq_len] int32, tokens dropped at the end)."""
    stream = np.fromiter(
        (t for ids in id_lists for t in (*ids, eos_id)), dtype=np.int32, count=sum(len(i) + 1 for i in id_lists)
    )
    n = len(stream) // seq_len
    return stream[: n * seq_len].reshape(n, seq_len), len(stream) - n * seq_len


def tokenize_and_pack(batch: pd.DataFrame, tokenizer_path: str, seq_len: int) -> pa.Table:
    """Rows of `input_ids` as fixed-size int32 lists (plain parquet any reader understands)."""
    tok = _tokenizer(tokenizer_path)
    ids = tok(list(batch["text"]), add_special_tokens=False)["input_ids"]
    sequences, dropped = pack_ids(ids, tok.eos_token_id, seq_len)
    # Batch totals ride on an extra row (flag `is_totals`) that the stage drops from the shards,
    # so counts survive even for a batch too short to fill one sequence.
    sequences = np.concatenate([sequences, np.zeros((1, seq_len), dtype=np.int32)])
    totals = np.zeros((3, len(sequences)), dtype=np.int64)
    totals[:, -1] = [sum(len(i) + 1 for i in ids), dropped, len(ids)]
    is_totals = np.zeros(len(sequences), dtype=np.int8)
    is_totals[-1] = 1
    return pa.table({
        "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(sequences.ravel(), pa.int32()), seq_len),
        "batch_tokens": totals[0], "batch_dropped": totals[1], "batch_docs": totals[2], "is_totals": is_totals,
    })
