"""Word hashes shared by the repetition filter and MinHash, computed once per document.

Words are the whitespace-split, lower-cased tokens of the normalized text; each is hashed
with xxh3-64, which is stable across processes (Python's `hash` is salted per process).
"""

from __future__ import annotations

import numpy as np
import xxhash

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
_MIX = np.uint64(0x9E3779B97F4A7C15)


def word_hashes(words: list[str]) -> np.ndarray:
    digest = xxhash.xxh3_64_intdigest
    return np.fromiter((digest(w.encode("utf-8")) for w in words), dtype=np.uint64, count=len(words))


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per n-gram (positions 0..len-n), combining word hashes in order."""
    if len(hashes) < n:
        return np.zeros(0, dtype=np.uint64)
    out = hashes[: len(hashes) - n + 1].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out = (out * _MIX) ^ hashes[k : len(hashes) - n + 1 + k]
    return out
