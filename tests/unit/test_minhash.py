"""MinHash signatures estimate Jaccard; union-find keeps the smallest id per cluster."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pydantic import ValidationError

from data_jobs.minhash import DedupConfig, UnionFind, band_keys, estimated_jaccard, permutations, signature
from data_jobs.text_stats import ngram_hashes, words_and_hashes


def word_hashes(words: list[str]):
    return words_and_hashes(" ".join(words))[0]


def _shingles(words, n=5):
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_signature_similarity_tracks_true_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    cfg = DedupConfig(num_perm=256, bands=32, rows=8)
    perms = permutations(cfg.num_perm, cfg.seed)
    for edit in (0.02, 0.05, 0.2, 0.5):
        a = [rng.choice(vocab) for _ in range(600)]
        b = [rng.choice(vocab) if rng.random() < edit else w for w in a]
        true = len(_shingles(a) & _shingles(b)) / len(_shingles(a) | _shingles(b))
        est = estimated_jaccard(signature(word_hashes(a), cfg, perms), signature(word_hashes(b), cfg, perms))
        assert abs(est - true) < 0.1, (edit, true, est)


def test_identical_documents_share_every_band_and_distinct_ones_none():
    cfg = DedupConfig()
    perms = permutations(cfg.num_perm, cfg.seed)
    a = word_hashes("the quick brown fox jumps over the lazy dog again and again".split())
    b = word_hashes("completely different words make up this other short document here today".split())
    assert band_keys(signature(a, cfg, perms), cfg) == band_keys(signature(a.copy(), cfg, perms), cfg)
    assert not set(band_keys(signature(a, cfg, perms), cfg)) & set(band_keys(signature(b, cfg, perms), cfg))


def test_ngram_hashes_are_order_sensitive():
    h = word_hashes("a b c a b c".split())
    grams = ngram_hashes(h, 3)
    assert len(grams) == 4 and grams[0] == grams[3] and len(set(grams.tolist())) == 3
    assert not np.array_equal(ngram_hashes(word_hashes("a b".split()), 2), ngram_hashes(word_hashes("b a".split()), 2))


def test_union_find_keeps_smallest_id_deterministically():
    uf = UnionFind()
    for a, b in [("d", "b"), ("c", "d"), ("x", "y")]:
        uf.union(a, b)
    clusters = uf.clusters()
    assert sorted(clusters) == ["b", "x"]
    assert sorted(clusters["b"]) == ["b", "c", "d"]


def test_bands_must_fit_permutations():
    with pytest.raises(ValidationError, match="exceeds num_perm"):
        DedupConfig(num_perm=64, bands=16, rows=8)

