"""Calibration and evaluation token blocks for the compression stages.

Both AWQ and Wanda need activations from real text, and their quality table needs held-out
perplexity on text the calibration never saw: one function cuts both from the same source so
every row of the table is measured on identical tokens.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from jobs.compress_config import CalibrationConfig

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl"}


@dataclass
class Blocks:
    calib: Any  # LongTensor [n_calib, seq_len]
    eval: Any  # LongTensor [n_eval, seq_len]
    source: str

    @property
    def calib_tokens(self) -> int:
        return int(self.calib.numel())


def _files(sources: list[str]) -> list[Path]:
    files: list[Path] = []
    for s in sources:
        p = Path(s)
        matches = [Path(m) for m in sorted(glob.glob(s, recursive=True))] if any(c in s for c in "*?[") else [p]
        if not matches or not all(m.exists() for m in matches):
            raise UserError(f"calibration source {s!r} does not exist")
        for m in matches:
            files += sorted(f for f in m.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES) if m.is_dir() else [m]
    if not files:
        raise UserError(f"calibration sources {sources} hold no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return files


def _texts(path: Path) -> list[str]:
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return [raw]
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(str(json.loads(line)["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path}:{n}: not a JSON object with a 'text' field ({exc})") from None
    return texts


def blocks_from_text(cfg: CalibrationConfig, tokenizer, seq_len: int) -> Blocks:
    import torch

    ids: list[int] = []
    for f in _files(cfg.sources):
        for text in _texts(f):
            ids += tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    table = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return _split(cfg, table, f"{len(cfg.sources)} text source(s), {len(ids)} tokens", seq_len)


def blocks_from_shards(cfg: CalibrationConfig, index: dict) -> Blocks:
    """The tokenizer stage's held-out packed shards (`index.json`), already in blocks."""
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    val = index["splits"]["val"]
    table = pads.dataset(val["path"], format="parquet").head(cfg.calib_sequences + cfg.eval_sequences, columns=["input_ids"])
    if table.num_rows == 0:
        raise UserError(f"the held-out split {val['path']} is empty: no calibration text")
    ids = torch.from_numpy(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype("int64"))
    if cfg.seq_len and cfg.seq_len < ids.shape[1]:
        ids = ids[:, : cfg.seq_len]
    return _split(cfg, ids, f"held-out shards {val['path']}", ids.shape[1])


def _split(cfg: CalibrationConfig, table, source: str, seq_len: int) -> Blocks:
    n = table.shape[0]
    # Calibration first; what is left (up to eval_sequences) is never seen by the calibration.
    n_calib = min(cfg.calib_sequences, n - 1)
    calib_tokens = max(n_calib, 0) * seq_len
    if calib_tokens < cfg.min_calib_tokens or n_calib < 1:
        raise UserError(
            f"too little calibration text: {source} gives {n} block(s) of {seq_len} tokens "
            f"({calib_tokens} calibration tokens; calibration.min_calib_tokens is {cfg.min_calib_tokens}, and at "
            f"least one more block is needed for held-out perplexity)"
        )
    return Blocks(calib=table[:n_calib], eval=table[n_calib: n_calib + cfg.eval_sequences], source=source)
