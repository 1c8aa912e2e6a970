"""Word hashes shared by the repetition filter and MinHash, computed once per document.

Words are the runs of non-whitespace bytes of the lower-cased UTF-8 text. Each word's hash
is a polynomial hash over its bytes computed for all words at once with numpy prefix sums
(wrapping uint64 arithmetic; the odd base has an inverse modulo 2^64), then mixed with the
splitmix64 finalizer. Hashing word by word in Python costs about as much as all the filters
together; this is much faster and stable across processes (unlike Python's `hash`).
"""

from __future__ import annotations

import numpy as np

_BASE = np.uint64(0x100000001B3)  # FNV-64 prime: odd, so invertible modulo 2^64
_MIX = np.uint64(0x9E3779B97F4A7C15)
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_powers = np.ones(1, dtype=np.uint64)
_inverse_powers = np.ones(1, dtype=np.uint64)


def _inverse(a: int) -> int:
    return pow(a, -1, 1 << 64)


def _ensure_powers(n: int) -> None:
    global _powers, _inverse_powers
    if len(_powers) >= n:
        return
    size = max(n, 2 * len(_powers), 1 << 16)
    with np.errstate(over="ignore"):
        steps = np.full(size, _BASE, dtype=np.uint64)
        steps[0] = 1
        _powers = np.cumprod(steps, dtype=np.uint64)
        steps[1:] = np.uint64(_inverse(int(_BASE)))
        _inverse_powers = np.cumprod(steps, dtype=np.uint64)


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def words_and_hashes(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash, byte length) of each whitespace-separated word of `text`, lower-cased."""
    data = np.frombuffer(text.lower().encode("utf-8"), dtype=np.uint8)
    if len(data) == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    is_word = ~_SPACE[data]
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    _ensure_powers(len(data) + 1)
    with np.errstate(over="ignore"):
        prefix = np.concatenate(([np.uint64(0)], np.cumsum(data.astype(np.uint64) * _powers[: len(data)], dtype=np.uint64)))
        raw = (prefix[ends] - prefix[starts]) * _inverse_powers[starts]
        hashes = _splitmix(raw + (ends - starts).astype(np.uint64) * _MIX)
    return hashes, (ends - starts).astype(np.int64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per n-gram (positions 0..len-n), combining word hashes in order."""
    if len(hashes) < n:
        return np.zeros(0, dtype=np.uint64)
    out = hashes[: len(hashes) - n + 1].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out = (out * _MIX) ^ hashes[k : len(hashes) - n + 1 + k]
    return out
