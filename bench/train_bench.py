"""Benchmark of stage `pretrain` against a plain PyTorch loop, same model, data, global batch
and threads, on this machine's CPUs.

    .venv/bin/python bench/train_bench.py [--steps 40] [--warmup 10]

Ours: the `pretrain` stage (Ray Train TorchTrainer, 2 workers x 1 thread, DeepSpeed ZeRO-2,
checkpoints off until the end) on shards from the `data` + `tokenizer` stages (stdlib docs,
seq 128). Peer: one process, torch.set_num_threads(2), AdamW, the same Llama (4 layers,
hidden 256) on the same global batch of 16 sequences. Both: tokens/s over the steps after
`--warmup`, measured from wall-clock timestamps (everything between steps included). The
peer runs before and after ours and its mean is the reference: on 2 shared cores a single
peer run swings by +-15%. Ends with one JSON line; target ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = {"preset": "tiny", "overrides": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                                         "num_attention_heads": 4, "num_key_value_heads": 4}}


def ours(runs: Path, steps: int, warmup: int) -> tuple[float, dict]:
    from cluster.config import build_recipe
    from cluster.runner import run_stage
    from cluster.records import read_history

    recipe = build_recipe({
        "run": "train-bench", "runs_dir": str(runs), "ray": {"num_cpus": 2, "dashboard": False},
        "stages": ["data", "tokenizer", "pretrain"],
        "data": {"sources": ["stdlib:docs", "stdlib:code/json/*.py"], "val_fraction": 0.3},
        "tokenizer": {"vocab_size": 4096, "seq_len": 128},
        "pretrain": {"model": MODEL, "steps": steps, "global_batch": 16, "micro_batch": 8, "warmup_steps": 2,
                     "zero_stage": 2, "checkpoint_every": steps, "eval_every": steps,
                     "scaling": {"num_workers": 2, "threads_per_worker": 1, "cpus_per_worker": 1}},
    })
    for stage in recipe.stages:
        run_stage(recipe, stage)
    history = read_history(runs / "train-bench" / "pretrain" / "metrics.jsonl")
    steady = [h for h in history if h["step"] > warmup and h["step"] < steps]  # the last step also checkpoints
    span = steady[-1]["wall_time"] - steady[0]["wall_time"]
    tokens = 16 * 128 * (len(steady) - 1)
    index = json.loads((runs / "train-bench" / "tokenizer" / "index.json").read_text())
    return tokens / span, index


def peer(index: dict, steps: int, warmup: int) -> float:
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    from jobs.model_factory import ModelConfig, build_model, llama_config

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = llama_config(ModelConfig(**MODEL), vocab_size=index["vocab_size"], seq_len=128,
                          bos_id=index["bos_id"], eos_id=index["eos_id"], pad_id=index["pad_id"])
    model = build_model(config, use_gpu=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    table = pads.dataset(index["splits"]["train"]["path"], format="parquet").to_table(columns=["input_ids"])
    data = torch.from_numpy(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype("int64"))
    stamps = []
    for step in range(steps):
        batch = data[(step * 16) % (len(data) - 16):][:16]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.time())
    steady = stamps[warmup:steps - 1]
    return 16 * 128 * (len(steady) - 1) / (steady[-1] - steady[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "train")
    args = parser.parse_args()
    import shutil

    shutil.rmtree(args.out / "train-bench" / "pretrain", ignore_errors=True)
    index_path = args.out / "train-bench" / "tokenizer" / "index.json"
    peer_runs = [peer(json.loads(index_path.read_text()), args.steps, args.warmup)] if index_path.exists() else []
    ours_tps, index = ours(args.out, args.steps, args.warmup)
    print(f"ours (Ray Train, 2 workers x 1 thread, ZeRO-2): {ours_tps:,.0f} tokens/s", flush=True)
    peer_runs.append(peer(index, args.steps, args.warmup))
    peer_tps = sum(peer_runs) / len(peer_runs)
    runs = ", ".join(f"{p:,.0f}" for p in peer_runs)
    print(f"peer (plain PyTorch, 1 process x 2 threads): {peer_tps:,.0f} tokens/s (runs: {runs})", flush=True)
    print(json.dumps({"bench": "train", "ours_tokens_s": round(ours_tps), "peer_tokens_s": round(peer_tps),
                      "ratio": round(ours_tps / peer_tps, 3)}))


if __name__ == "__main__":
    main()
