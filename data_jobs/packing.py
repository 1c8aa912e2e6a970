"""Tokenize and pack, for `map_batches`: each document's ids plus EOS are concatenated and
cut into fixed-length training sequences (the tail of a batch shorter than one sequence is
dropped and counted). Documents never cross the train/val boundary: each split is packed
on its own."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd


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


def tokenize_and_pack(batch: pd.DataFrame, tokenizer_path: str, seq_len: int) -> pd.DataFrame:
    tok = _tokenizer(tokenizer_path)
    ids = tok(list(batch["text"]), add_special_tokens=False)["input_ids"]
    sequences, dropped = pack_ids(ids, tok.eos_token_id, seq_len)
    tokens = sum(len(i) + 1 for i in ids)
    frame = pd.DataFrame({"input_ids": list(sequences)})
    # Batch totals ride on the first row so the stage can add them up without a second pass.
    frame["batch_tokens"] = 0
    frame["batch_dropped"] = 0
    frame["batch_docs"] = 0
    if len(frame):
        frame.loc[0, ["batch_tokens", "batch_dropped", "batch_docs"]] = [tokens, dropped, len(ids)]
    return frame
