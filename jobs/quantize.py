"""Stage `quantize` (and `aero quantize MODEL_DIR`): AWQ 4-bit checkpoints and the table that
says what they cost and buy against the fp model and the round-to-nearest baseline.

The driver checks everything that can be wrong (model folder, architecture, group sizes,
calibration text) before any work; the work runs as one Ray task on a CPU or GPU node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from cluster.manifest import atomic_write_text, hash_path, read_manifest
from cluster.stage import Stage, StageContext, StageResult
from jobs.calibration import Blocks, blocks_from_shards, blocks_from_text
from jobs.compress_config import CompressBase, QuantizeConfig


def source_model(ctx: StageContext, cfg: CompressBase) -> Path:
    return ctx.model_dir(cfg.model).resolve()


def calibration_blocks(ctx: StageContext, cfg: CompressBase, model: Path) -> Blocks:
    if not cfg.calibration.sources:
        return blocks_from_shards(cfg.calibration, json.loads(ctx.upstream_output("tokenizer", "index").read_text()))
    from transformers import AutoConfig, AutoTokenizer

    seq_len = cfg.calibration.seq_len or min(512, AutoConfig.from_pretrained(model).max_position_embeddings)
    return blocks_from_text(cfg.calibration, AutoTokenizer.from_pretrained(model), seq_len)


def compress_inputs(ctx: StageContext, cfg: CompressBase) -> dict[str, str]:
    """The model and the calibration text, hashed: a change of either reruns the stage."""
    inputs = ctx.fingerprints([cfg.model])
    for s in cfg.calibration.sources:
        inputs[f"calibration:{s}"] = hash_path(Path(s)) if Path(s).exists() else "glob"
    if not cfg.calibration.sources:
        inputs["stage:tokenizer"] = ctx.upstream("tokenizer").output_id
    return inputs


def quantize_all(cfg: QuantizeConfig, model_dir: str, blocks: Blocks, out_root: str, info: dict[str, Any]) -> list[dict[str, Any]]:
    """The Ray task: AWQ (and RTN) per group size, each saved, reloaded and measured."""
    from jobs.awq_quantize import quantize_awq
    from jobs.compression_eval import measure, warm_up

    warm_up(Path(model_dir))
    gen = dict(gen_prompts=cfg.gen_prompts, gen_tokens=cfg.gen_tokens)
    fp = measure("fp32", Path(model_dir), blocks.eval, method="fp", **gen)
    rows = [fp]
    fp16_bytes = 2 * info["quantized_params"]
    methods = [("awq", True)] + ([("rtn", False)] if cfg.rtn_baseline else [])
    for g in cfg.group_sizes:
        for method, search in methods:
            out = quantize_awq(Path(model_dir), Path(out_root) / f"{method}-g{g}", blocks.calib, g,
                               zero_point=cfg.zero_point, duo_scaling=cfg.duo_scaling, apply_clip=cfg.apply_clip,
                               search=search)
            row = measure(out.name, out, blocks.eval, method=f"{method.upper()} W4", fp_ppl=fp["ppl"], group_size=g, **gen)
            row["quantized_vs_fp16"] = row["packed_mb"] * 1e6 / fp16_bytes
            rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]], group_sizes: list[int]) -> dict[str, Any]:
    """Self-explaining figures; the unsuffixed `awq_*` keys are the first (served) group size."""
    by = {r["name"]: r for r in rows}
    out: dict[str, Any] = {"fp_ppl": by["fp32"]["ppl"], "by_group": {}}
    for g in group_sizes:
        awq, rtn = by[f"awq-g{g}"], by.get(f"rtn-g{g}")
        fig = {"awq_ppl": awq["ppl"], "awq_vs_fp": awq["ppl_vs_fp"], "awq_size_vs_fp16": awq["quantized_vs_fp16"]}
        if rtn:
            fig.update(rtn_ppl=rtn["ppl"], awq_vs_rtn=awq["ppl"] / rtn["ppl"])
        out["by_group"][str(g)] = fig
    out.update(out["by_group"][str(group_sizes[0])])
    return out


def _sparse_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """The run's `sparsify` rows (measured on the same held-out blocks), when that stage finished."""
    manifest = read_manifest(ctx.run_dir / "sparsify")
    if manifest is None or manifest.status != "finished":
        return []
    rows = json.loads(Path(manifest.outputs["sparsify"].path).read_text())["rows"]
    return [r for r in rows if r["method"] != "fp"]


def run(ctx: StageContext, cfg: QuantizeConfig) -> StageResult:
    import ray

    from jobs.awq_quantize import check_quantizable
    from jobs.compression_eval import table

    model = source_model(ctx, cfg)
    info = check_quantizable(model, cfg.group_sizes, apply_clip=cfg.apply_clip)
    blocks = calibration_blocks(ctx, cfg, model)
    task = ray.remote(num_cpus=cfg.cpus, num_gpus=cfg.gpus)(quantize_all)
    rows = ray.get(task.remote(cfg, str(model), blocks, str(ctx.stage_dir), info))
    rows += _sparse_rows(ctx)
    result = {"model": str(model), **info, "calibration": blocks.source, "calib_tokens": blocks.calib_tokens,
              "eval_tokens": int(blocks.eval.numel()), **summary(rows, cfg.group_sizes), "rows": rows}
    atomic_write_text(ctx.stage_dir / "quant.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(ctx.stage_dir / "quant.md", table(rows))
    metrics = {k: v for k, v in result.items() if isinstance(v, float)}
    outputs = {"model": ctx.stage_dir / f"awq-g{cfg.group_sizes[0]}", "quant": ctx.stage_dir / "quant.json",
               "table": ctx.stage_dir / "quant.md"}
    return StageResult(outputs=outputs, metrics=metrics)


def _inputs(ctx: StageContext, cfg: QuantizeConfig) -> dict[str, str]:
    inputs = compress_inputs(ctx, cfg)
    sparse = read_manifest(ctx.run_dir / "sparsify")
    if sparse is not None and sparse.status == "finished":
        inputs["stage:sparsify"] = sparse.output_id
    return inputs


def memory_needs(recipe, cfg: QuantizeConfig) -> list:
    """The planner's figure for the quantizing task (cluster/plan.py): the fp model and the
    quantized copy being written, the calibration tokens' layer inputs and MLP activations
    (autoawq runs every calibration token through each layer at once), and the logits of the
    perplexity measurement."""
    from cluster.plan import WorkerNeed
    from jobs.memory_estimate import WORKER_RUNTIME_BYTES, model_shape_for

    shape = model_shape_for(recipe, cfg.model)
    if shape is None:
        return []
    seq = cfg.calibration.seq_len or min(recipe.stage_config("tokenizer").seq_len, shape.context)
    tokens = cfg.calibration.calib_sequences * seq
    width = 2 if cfg.gpus else 4
    parts = {"runtime": WORKER_RUNTIME_BYTES, "models": 2 * shape.params * 4,
             "calibration": tokens * (2 * shape.hidden + 3 * shape.intermediate) * 4,
             "logits": seq * shape.vocab * 4 * 3}
    if cfg.gpus:
        gpu = sum(parts.values()) - WORKER_RUNTIME_BYTES
        return [WorkerNeed("quantize", "AWQ task (GPU)", 1, WORKER_RUNTIME_BYTES + 4 * shape.params, gpu * width // 4,
                           gpus_per_worker=cfg.gpus, cpus_per_worker=cfg.cpus, parts=parts)]
    return [WorkerNeed("quantize", "AWQ task", 1, sum(parts.values()), cpus_per_worker=cfg.cpus, parts=parts,
                       note=f"{tokens} calibration tokens")]


STAGE = Stage(name="quantize", config_model=QuantizeConfig, run=run, outside_inputs=_inputs, memory=memory_needs,
              description="AWQ 4-bit checkpoints with an RTN baseline and a quality/size/speed table")


def quantize_recipe(model_dir: Path, runs_dir: Path, run: str | None, settings: dict[str, Any]) -> dict[str, Any]:
    """The one-stage recipe behind `aero quantize MODEL_DIR` (a run of its own, same code path)."""
    if not settings.get("calibration", {}).get("sources"):
        raise UserError("aero quantize needs calibration text: --calibration PATH (text files, folders or globs)")
    name = run or f"quantize-{model_dir.resolve().name}"
    return {"run": name, "runs_dir": str(runs_dir), "stages": ["quantize"],
            "quantize": {**settings, "model": str(model_dir.resolve())}}


def quantize_model(model_dir: Path, calibration: list[str], overrides: list[str], *, run: str | None,
                   runs_dir: Path, address: str | None = None) -> str:
    """`aero quantize MODEL_DIR`: the quantize stage as a run of its own; returns the quality
    table and where the AWQ checkpoint is."""
    from cluster.config import apply_overrides, build_recipe
    from cluster.runner import run_stage

    settings = apply_overrides({"calibration": {"sources": list(calibration)}}, overrides)
    recipe = build_recipe(quantize_recipe(model_dir, runs_dir, run, settings), source="aero quantize")
    if address:
        recipe.ray.address = address
    manifest = run_stage(recipe, "quantize")
    stage_dir = recipe.run_dir / "quantize"
    return ((stage_dir / "quant.md").read_text() + "\n"
            + f"quantize: {manifest.status}; AWQ checkpoint {manifest.outputs['model'].path}; table {stage_dir / 'quant.json'}")
