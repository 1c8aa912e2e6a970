"""AWQ quality on a pretrained model: ours vs round-to-nearest vs autoawq exactly as shipped.

All three write the same 4-bit GEMM checkpoint format from the same fp model, calibrate (where
they calibrate) on the same held-out blocks, and are scored by the same loader on the same later
held-out blocks. "autoawq as shipped" is `AutoAWQForCausalLM.quantize` with its defaults and
its own quantizer, whose scale search corrupts its weight snapshot on CPU (see
jobs/awq_quantize.py); ours is the stage's code path.

    .venv/bin/python bench/quant_bench.py --model runs/tiny-cpu/pretrain/model \
        --index runs/tiny-cpu/tokenizer/index.json

The last line is JSON: `ratio` = RTN ppl / AWQ ppl at the first group size (> 1: AWQ better).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def shipped_autoawq(model_dir: Path, out: Path, calib, group_size: int) -> Path:
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    from jobs.awq_quantize import use_cpu_kernels

    use_cpu_kernels()
    model = AutoAWQForCausalLM.from_pretrained(str(model_dir))
    model.quantize(AutoTokenizer.from_pretrained(model_dir),
                   quant_config={"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"},
                   calib_data=[r.tolist() for r in calib], max_calib_samples=len(calib), max_calib_seq_len=calib.shape[1])
    model.save_quantized(str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--index", type=Path, required=True, help="the tokenizer stage's index.json (held-out shards)")
    ap.add_argument("--groups", type=int, nargs="+", default=[128, 32])
    ap.add_argument("--calib", type=int, default=32, help="calibration blocks")
    ap.add_argument("--eval", type=int, default=80, help="held-out blocks for perplexity")
    args = ap.parse_args()

    from jobs.awq_loader import load_causal_lm
    from jobs.awq_quantize import quantize_awq
    from jobs.calibration import blocks_from_shards
    from jobs.compress_config import CalibrationConfig
    from jobs.compression_eval import perplexity

    blocks = blocks_from_shards(CalibrationConfig(calib_sequences=args.calib, eval_sequences=args.eval),
                                json.loads(args.index.read_text()))
    print(f"model {args.model}; calibration {tuple(blocks.calib.shape)}, evaluation {tuple(blocks.eval.shape)} blocks")
    fp = perplexity(load_causal_lm(args.model), blocks.eval)
    print(f"fp32 ppl {fp:.4f}")
    figures: dict[str, float] = {"fp_ppl": fp}
    tmp = Path(tempfile.mkdtemp(prefix="quant_bench-"))
    try:
        for g in args.groups:
            runs = {
                "awq": lambda out: quantize_awq(args.model, out, blocks.calib, g),
                "rtn": lambda out: quantize_awq(args.model, out, blocks.calib, g, search=False),
                "autoawq_shipped": lambda out: shipped_autoawq(args.model, out, blocks.calib, g),
            }
            for name, fn in runs.items():
                start = time.perf_counter()
                out = fn(tmp / f"{name}-g{g}")
                seconds = time.perf_counter() - start
                ppl = perplexity(load_causal_lm(out), blocks.eval)
                figures[f"{name}_g{g}_ppl"] = ppl
                print(f"g{g:<4} {name:16s} ppl {ppl:.4f}  x fp {ppl / fp:.4f}  ({seconds:.1f}s)", flush=True)
            figures[f"awq_vs_rtn_g{g}"] = figures[f"awq_g{g}_ppl"] / figures[f"rtn_g{g}_ppl"]
            figures[f"awq_vs_fp_g{g}"] = figures[f"awq_g{g}_ppl"] / fp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    g = args.groups[0]
    figures["ratio"] = figures[f"rtn_g{g}_ppl"] / figures[f"awq_g{g}_ppl"]
    print(json.dumps({"bench": "quant", **{k: round(v, 5) for k, v in figures.items()}}))


if __name__ == "__main__":
    main()
