"""Pretraining throughput and MFU on one GPU, without Ray (Ray's wheel cannot travel to the
device machine): the stage's own per-worker loop (`jobs.train_loop.run_training` with
`LocalEnv`, DeepSpeed, bf16, FlashAttention-2 when flash-attn imports) on a ~1B Llama preset.

    python bench/gpu_train.py                       # 1b preset, seq 2048, on the GPU
    python bench/gpu_train.py --preset tiny --seq 128 --micro-batch 4 --steps 6 --warmup 2   # CPU smoke run

The shards are random token ids in the corpus stage's layout (parquet `input_ids` + an
index), so the figure measures the training step, not a tokenizer. MFU = FLOPs per token
(6N + 12 L h s) x tokens/s / peak; the peak is 989 TFLOP/s (H100/H200 dense bf16) unless
`--peak-tflops` says otherwise. Target: MFU >= 0.45. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def write_random_shards(root: Path, *, sequences: int, seq_len: int, vocab: int) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    index = {"vocab_size": vocab, "seq_len": seq_len, "bos_id": 1, "eos_id": 2, "pad_id": 0, "splits": {}}
    for split, n in (("train", sequences), ("val", 64)):
        folder = root / split
        folder.mkdir(parents=True)
        ids = rng.integers(3, vocab, size=(n, seq_len), dtype=np.int32)
        column = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), seq_len)
        pq.write_table(pa.table({"input_ids": column}), folder / "part-0.parquet")
        index["splits"][split] = {"path": str(folder), "files": ["part-0.parquet"], "sequences": n}
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of the steady-state figure")
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()

    import torch

    from jobs.model_factory import flops_per_token, llama_config, parameter_count, pick_attention
    from jobs.pretrain_config import PretrainConfig
    from jobs.train_loop import LocalEnv, run_training

    use_gpu = torch.cuda.is_available()
    context_bytes = 0
    if use_gpu:  # the CUDA context alone, before any tensor: what the allocator's peak leaves out
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        context_bytes = total - free - torch.cuda.memory_reserved()
    cfg = PretrainConfig.model_validate({
        "model": {"preset": args.preset}, "steps": args.steps, "warmup_steps": min(5, args.steps - 1),
        "global_batch": args.micro_batch * args.grad_accum, "micro_batch": args.micro_batch,
        "zero_stage": args.zero_stage, "activation_checkpointing": args.activation_checkpointing,
        "checkpoint_every": 10**9, "eval_every": 10**9, "log_every": 10**9, "peak_tflops": args.peak_tflops,
        "lr": 3e-4, "scaling": {"num_workers": 1, "use_gpu": use_gpu},
    })
    with tempfile.TemporaryDirectory() as tmp:
        index = write_random_shards(Path(tmp) / "shards", sequences=(args.steps + 1) * cfg.global_batch,
                                    seq_len=args.seq, vocab=args.vocab)
        plan = {k: index[k] for k in ("vocab_size", "seq_len", "bos_id", "eos_id", "pad_id")}
        plan.update(sequences_per_worker=index["splits"]["train"]["sequences"], world_size=1,
                    peak_flops=args.peak_tflops * 1e12)
        env = LocalEnv(index, cfg.micro_batch, Path(tmp) / "out", device="cuda" if use_gpu else "cpu")
        run_training(cfg, plan, env)
        history = [json.loads(line) for line in (Path(tmp) / "out" / "metrics.jsonl").read_text().splitlines()]

    # The last step also validates and saves a checkpoint: leave it out with the warm-up.
    steady = [h for h in history if args.warmup < h["step"] < args.steps]
    tokens_s = statistics.median(h["tokens_per_s"] for h in steady)
    config = llama_config(cfg.model, vocab_size=args.vocab, seq_len=args.seq, bos_id=1, eos_id=2, pad_id=0)
    mfu = flops_per_token(config, args.seq) * tokens_s / (args.peak_tflops * 1e12)
    device = torch.cuda.get_device_name(0) if use_gpu else "cpu"
    memory = torch.cuda.max_memory_allocated() / 2**30 if use_gpu else None
    from jobs.memory_estimate import llama_shape, training_needs

    need = training_needs("pretrain", llama_shape(config), workers=1, gpu=use_gpu, cpus_per_worker=1,
                          zero_stage=args.zero_stage, batch=args.micro_batch, seq_len=args.seq,
                          activation_checkpointing=args.activation_checkpointing, offload_optimizer=False)
    measured = (torch.cuda.max_memory_reserved() + context_bytes) / 2**30 if use_gpu else history[-1]["peak_rss_mb"] / 1024
    estimate = (need.gpu_bytes if use_gpu else need.ram_bytes) / 2**30
    print(f"planner: estimate {estimate:.1f} GiB vs measured peak {measured:.1f} GiB "
          f"({'allocator reserved + CUDA context' if use_gpu else 'RSS'}): {estimate / measured:.2f}x; "
          + ", ".join(f"{k} {v / 2**30:.1f}" for k, v in need.parts.items()), flush=True)
    print(f"{device}: {args.preset} ({parameter_count(config) / 1e9:.2f} B params), seq {args.seq}, "
          f"micro-batch {args.micro_batch}, attention {pick_attention() if use_gpu else 'sdpa'}, ZeRO-{args.zero_stage}: "
          f"{tokens_s:,.0f} tokens/s, MFU {mfu:.3f} of {args.peak_tflops:.0f} TFLOP/s", flush=True)
    print(json.dumps({"bench": "gpu_train", "device": device, "preset": args.preset, "seq_len": args.seq,
                      "tokens_s": round(tokens_s), "mfu": round(mfu, 4), "target_mfu": 0.45,
                      "max_memory_gib": round(memory, 1) if memory else None, "zero_stage": args.zero_stage,
                      "micro_batch": args.micro_batch, "activation_checkpointing": args.activation_checkpointing,
                      "plan_estimate_gib": round(estimate, 2), "measured_peak_gib": round(measured, 2),
                      "estimate_vs_measured": round(estimate / measured, 3)}))


if __name__ == "__main__":
    main()
