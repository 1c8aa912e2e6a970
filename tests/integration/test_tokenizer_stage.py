"""Stage `tokenizer` on a real local Ray: packed shards with no document crossing the train/val
boundary, and a clear error without the data stage."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
from transformers import AutoTokenizer
from typer.testing import CliRunner

from cluster.cli import app
from cluster.manifest import read_manifest


def test_stage_writes_shards_without_cross_split_leakage(ray_cluster, tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    rng = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa"]
    for i in range(16):
        body = " ".join(rng.choice(words) for _ in range(120))
        (root / f"d{i:02d}.txt").write_text(f"marker{i:02d}x " * 5 + body)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"run: tok\nruns_dir: {tmp_path / 'runs'}\nstages: [data, tokenizer]\n"
        f"data:\n  sources: ['{root}']\n  val_fraction: 0.3\n"
        "  quality: {gopher_quality: {enabled: false}, gopher_repetition: {enabled: false}, c4: {enabled: false}, language: {enabled: false}}\n"
        "  dedup: {near: false}\n"
        "tokenizer: {vocab_size: 400, seq_len: 32, docs_per_batch: 4}\n"
    )
    result = CliRunner().invoke(app, ["pipeline", str(recipe)])
    assert result.exit_code == 0, result.output
    stage = tmp_path / "runs/tok/tokenizer"
    index = json.loads((stage / "index.json").read_text())
    tok = AutoTokenizer.from_pretrained(index["tokenizer"])
    docs = pd.read_parquet(tmp_path / "runs/tok/data/documents")
    val_markers = {text.split()[0] for text, split in zip(docs["text"], docs["split"]) if split == "val"}
    assert 0 < len(val_markers) < 16
    decoded = {}
    for split in ("train", "val"):
        shards = pd.read_parquet(index["splits"][split]["path"])
        assert len(shards) == index["splits"][split]["sequences"] > 0
        assert all(len(ids) == 32 for ids in shards["input_ids"])
        decoded[split] = tok.decode(np.concatenate(list(shards["input_ids"])))
        assert index["splits"][split]["tokens"] == index["splits"][split]["sequences"] * 32 + index["splits"][split]["tokens_dropped"]
    assert not any(m in decoded["train"] for m in val_markers)
    assert any(m in decoded["val"] for m in val_markers)
    manifest = json.loads((stage / "manifest.json").read_text())
    # Lineage: the tokenizer depends on what the data stage wrote (its output_id), not only its config.
    assert manifest["inputs"]["stage:data"] == read_manifest(tmp_path / "runs/tok/data").output_id


def test_tokenizer_needs_data_first(ray_cluster, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run: nodata\nruns_dir: {tmp_path}\nstages: [tokenizer]\n")
    result = CliRunner().invoke(app, ["run", "tokenizer", str(recipe)])
    assert result.exit_code == 2
    assert "needs stage 'data' of run 'nodata', which has not run" in result.output

