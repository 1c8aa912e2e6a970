"""MinHash signatures, LSH band keys and union-find, in numpy.

datasketch's MinHash hashes one shingle per Python call; here a document's shingles are
hashed in one numpy expression over its word hashes (text_stats.py), which is what lets
the signature step keep up with the rest of the pipeline. Permutations are
(a * h + b) mod (2^61 - 1) as in datasketch, seeded from the config.
"""

from __future__ import annotations

import numpy as np
import xxhash
from pydantic import Field, model_validator

from cluster.config import StrictModel
from data_jobs.text_stats import ngram_hashes

_PRIME = np.uint64((1 << 61) - 1)
_MAX32 = np.uint64(0xFFFFFFFF)


class DedupConfig(StrictModel):
    exact: bool = True
    near: bool = True
    shingle_words: int = Field(default=5, ge=1)
    num_perm: int = Field(default=112, ge=8)
    bands: int = Field(default=16, ge=1)
    rows: int = Field(default=7, ge=1)
    threshold: float = Field(default=0.7, gt=0, le=1, description="estimated Jaccard a candidate pair must reach")
    seed: int = 1

    @model_validator(mode="after")
    def _bands_fit(self) -> "DedupConfig":
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        return self


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients below the prime, as datasketch draws them; `a * h` wraps modulo 2^64, which
    is what mixes the bits (small coefficients leave the map nearly monotonic in h)."""
    rng = np.random.RandomState(seed)
    a = rng.randint(1, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
    b = rng.randint(0, (1 << 61) - 1, size=num_perm, dtype=np.uint64)
    return a, b


def signature(word_hashes: np.ndarray, cfg: DedupConfig, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """uint32[num_perm] MinHash of the document's word n-gram shingles."""
    # A document shorter than one shingle is one shingle of all its words.
    shingles = ngram_hashes(word_hashes, min(cfg.shingle_words, max(len(word_hashes), 1)))
    if len(shingles) == 0:
        shingles = np.array([xxhash.xxh3_64_intdigest(b"")], dtype=np.uint64)
    shingles = shingles & _MAX32  # repeats do not change a minimum
    a, b = perms
    result = np.full(len(a), np.iinfo(np.uint64).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, len(shingles), 8192):  # bounded memory for long documents
            values = (np.outer(shingles[start : start + 8192], a) + b) % _PRIME
            np.minimum(result, values.min(axis=0), out=result)
    return (result & _MAX32).astype(np.uint32)


def band_keys(sig: np.ndarray, cfg: DedupConfig) -> list[int]:
    """One 64-bit key per band: the band's index and its rows hashed together."""
    return [
        xxhash.xxh3_64_intdigest(sig[i * cfg.rows : (i + 1) * cfg.rows].tobytes(), seed=i) for i in range(cfg.bands)
    ]


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        parent = self.parent.setdefault(x, x)
        while parent != x:
            grand = self.parent.setdefault(parent, parent)
            self.parent[x] = grand
            x, parent = parent, grand
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller id becomes the root, so the kept document is deterministic.
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra

    def clusters(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for x in list(self.parent):
            groups.setdefault(self.find(x), []).append(x)
        return groups
