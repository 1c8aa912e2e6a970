"""Stage `sparsify`: Wanda pruning (Sun et al. 2023) to 2:4 semi-structured and unstructured sparsity.

Written here because no maintained library does it on CPU with our transformers:
llm-compressor has Wanda but needs an accelerator and pins transformers <= 5.17, and
`torch.ao.pruning` has only magnitude sparsifiers. Wanda is short: a weight's importance is
|W_ij| * ||X_j||_2 (its input channel's activation norm on calibration text), compared within
each output row (unstructured) or within each group of 4 inputs (2:4), layer by layer so that
each layer sees the activations of the already-pruned layers before it. The result is a normal
HF checkpoint with zeros; on a GPU node `to_semi_structured` turns 2:4 layers into
`torch.sparse` semi-structured tensors for the sparse tensor cores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from cluster.manifest import atomic_write_text
from cluster.stage import Stage, StageContext, StageResult
from jobs.compress_config import SparsifyConfig

PATTERN_DIRS = {"2:4": "sparse-2of4", "unstructured": "sparse-unstructured"}


class _Stop(Exception):
    """Raised after the layer being pruned, so later layers are not computed for nothing."""


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no model.layers: only decoder-only causal LMs can be pruned")
    return layers


def _prune_mask(metric, pattern: str, sparsity: float):
    """True where a weight is pruned."""
    import torch

    out_f, in_f = metric.shape
    if pattern == "2:4":
        groups = metric.reshape(out_f, in_f // 4, 4)
        drop = torch.topk(groups, 2, dim=-1, largest=False).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True).reshape(out_f, in_f)
    k = int(in_f * sparsity)
    drop = torch.topk(metric, k, dim=1, largest=False).indices
    return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, drop, True)


def wanda_prune(model, calib, pattern: str, sparsity: float = 0.5, batch: int = 8) -> list[str]:
    """Prune every Linear of every decoder layer in place; returns the pruned layers' names."""
    import torch

    pruned: list[str] = []
    for i, layer in enumerate(decoder_layers(model)):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        if pattern == "2:4" and (bad := [n for n, m in linears.items() if m.in_features % 4]):
            raise UserError(f"2:4 sparsity needs input sizes divisible by 4; layer {i}: {bad}")
        sq = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}

        def record(name):
            def hook(_module, inputs, _output):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                sq[name] += x.pow(2).sum(0)
            return hook

        def stop(*_):
            raise _Stop

        handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
        handles.append(layer.register_forward_hook(stop))
        with torch.no_grad():
            for x in calib.split(batch):
                try:
                    model(input_ids=x, use_cache=False)
                except _Stop:
                    pass
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, m in linears.items():
                metric = m.weight.abs().float() * sq[n].sqrt().float()[None, :]
                m.weight[_prune_mask(metric, pattern, sparsity)] = 0
                pruned.append(f"model.layers.{i}.{n}")
    return pruned


def to_semi_structured(model, names: list[str]):
    """On CUDA (fp16/bf16): store 2:4-pruned weights as semi-structured sparse tensors."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    for n in names:
        m = model.get_submodule(n)
        m.weight = torch.nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    return model


def sparsify_all(cfg: SparsifyConfig, model_dir: str, blocks, out_root: str) -> list[dict[str, Any]]:
    """The Ray task: prune a fresh copy of the model per pattern, save it, measure it."""
    from transformers import AutoTokenizer

    from jobs.awq_loader import load_causal_lm
    from jobs.compression_eval import measure, warm_up, zero_fraction

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    warm_up(Path(model_dir))
    gen = dict(gen_prompts=cfg.gen_prompts, gen_tokens=cfg.gen_tokens)
    fp = measure("fp32", Path(model_dir), blocks.eval, method="fp", **gen)
    rows = [fp]
    for pattern in cfg.patterns:
        model = load_causal_lm(model_dir)
        names = wanda_prune(model, blocks.calib, pattern, cfg.sparsity)
        out = Path(out_root) / PATTERN_DIRS[pattern]
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        row = measure(out.name, out, blocks.eval, method=f"wanda {pattern}", fp_ppl=fp["ppl"],
                      sparsity=zero_fraction(model, names), **gen)
        rows.append(row)
    return rows


def run(ctx: StageContext, cfg: SparsifyConfig) -> StageResult:
    import ray

    from jobs.compression_eval import table
    from jobs.quantize import calibration_blocks, source_model

    model = source_model(ctx, cfg)
    blocks = calibration_blocks(ctx, cfg, model)
    task = ray.remote(num_cpus=cfg.cpus, num_gpus=cfg.gpus)(sparsify_all)
    rows = ray.get(task.remote(cfg, str(model), blocks, str(ctx.stage_dir)))
    result = {"model": str(model), "calibration": blocks.source, "calib_tokens": blocks.calib_tokens,
              "eval_tokens": int(blocks.eval.numel()), "rows": rows}
    atomic_write_text(ctx.stage_dir / "sparsify.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(ctx.stage_dir / "sparsify.md", table(rows))
    outputs = {PATTERN_DIRS[p].replace("-", "_"): ctx.stage_dir / PATTERN_DIRS[p] for p in cfg.patterns}
    metrics = {f"{r['name'].replace('-', '_')}_ppl": r["ppl"] for r in rows}
    return StageResult(outputs={**outputs, "sparsify": ctx.stage_dir / "sparsify.json"}, metrics=metrics)


def _inputs(ctx: StageContext, cfg: SparsifyConfig) -> dict[str, str]:
    from jobs.quantize import compress_inputs

    return compress_inputs(ctx, cfg)


STAGE = Stage(name="sparsify", config_model=SparsifyConfig, run=run, outside_inputs=_inputs,
              description="Wanda pruning to 2:4 and unstructured sparsity, with a quality table")
