"""One row of the compression table: held-out perplexity, size on disk, load time, CPU tokens/s.

Every model (fp, AWQ, RTN, sparse) is loaded by the same loader and measured on the same
held-out token blocks, so the rows differ only in their weights.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from jobs.awq_loader import AWQ_SUFFIXES, load_causal_lm


def perplexity(model, blocks, batch: int = 8) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for x in blocks.split(batch):
            total += model(input_ids=x, labels=x).loss.item() * len(x)
    return math.exp(total / len(blocks))


def generation_speed(model, blocks, prompts: int, new_tokens: int, prompt_len: int = 32) -> float:
    """Greedy decode tokens/s at batch 1 (after one warm-up), the way one chat user sees it."""
    import torch

    rows = [blocks[i % len(blocks), :prompt_len][None] for i in range(prompts)]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=model.config.pad_token_id, use_cache=True)
    with torch.no_grad():
        model.generate(rows[0], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        start = time.perf_counter()
        for r in rows:
            model.generate(r, **kwargs)
        return prompts * new_tokens / (time.perf_counter() - start)


def weight_bytes(path: Path) -> dict[str, int]:
    """Bytes of all weights on disk, and of the packed (quantized) tensors alone."""
    from safetensors import safe_open

    total = packed = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        total += f.stat().st_size
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if key.endswith(AWQ_SUFFIXES):
                    t = st.get_slice(key)
                    n = math.prod(t.get_shape())
                    packed += n * (2 if t.get_dtype() in ("F16", "BF16") else 4)
    return {"total": total, "packed": packed}


def zero_fraction(model, names: list[str]) -> float:
    zeros = total = 0
    for n in names:
        w = model.get_submodule(n).weight
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def warm_up(path: Path) -> None:
    """Load once untimed, so the first row's load time does not include first imports."""
    load_causal_lm(path)


def measure(name: str, path: Path, blocks, *, method: str, gen_prompts: int, gen_tokens: int,
            fp_ppl: float | None = None, **extra: Any) -> dict[str, Any]:
    start = time.perf_counter()
    model = load_causal_lm(path)
    load_s = time.perf_counter() - start
    ppl = perplexity(model, blocks)
    size = weight_bytes(path)
    return {
        "name": name, "method": method, "path": str(path), **extra,
        "ppl": ppl, "ppl_vs_fp": ppl / fp_ppl if fp_ppl else 1.0,
        "weights_mb": size["total"] / 1e6, "packed_mb": size["packed"] / 1e6,
        "load_s": load_s, "gen_tokens_per_s": generation_speed(model, blocks, gen_prompts, gen_tokens),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the rows, for the run report."""
    lines = ["| model | method | group | held-out ppl | x fp | weights MB | quantized layers x fp16 | load s | CPU tok/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("quantized_vs_fp16")
        lines.append(
            f"| {r['name']} | {r['method']} | {r.get('group_size') or '-'} | {r['ppl']:.3f} | {r['ppl_vs_fp']:.4f} | "
            f"{r['weights_mb']:.2f} | {f'{ratio:.3f}' if ratio else '-'} | {r['load_s']:.2f} | {r['gen_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"
