"""Configs of the model-compression stages: `quantize` (AWQ + RTN baseline) and `sparsify` (Wanda)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from cluster.config import StrictModel


class CalibrationConfig(StrictModel):
    """Where calibration and evaluation text comes from; both stages use the same blocks.

    Empty `sources`: the run's tokenizer stage's held-out shards (the first `calib_sequences`
    blocks calibrate, the next `eval_sequences` measure perplexity, so the two never overlap).
    Otherwise: text files, folders or globs (.txt/.md/.rst/.py/.jsonl with a `text` field),
    tokenized with the model's own tokenizer and cut into `seq_len` blocks the same way.
    """

    sources: list[str] = Field(default_factory=list, description="text files/folders/globs; empty = the run's held-out shards")
    calib_sequences: int = Field(default=32, ge=1, description="calibration blocks")
    eval_sequences: int = Field(default=48, ge=1, description="held-out blocks for perplexity (after the calibration ones)")
    seq_len: int | None = Field(default=None, ge=16, description="block length; default: the shards' seq_len, else min(512, context)")
    min_calib_tokens: int = Field(default=2048, ge=1, description="fewer calibration tokens than this is an error")


class CompressBase(StrictModel):
    model: str = Field(default="pretrain", description="stage whose exported model is compressed, or a model folder")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    gen_tokens: int = Field(default=32, ge=1, description="new tokens per prompt when timing CPU generation")
    gen_prompts: int = Field(default=3, ge=1)
    cpus: float = Field(default=2.0, gt=0, description="CPUs of the Ray task that does the work")
    gpus: float = Field(default=0.0, ge=0, description="GPUs of that task (quantize on a GPU node when > 0)")


class QuantizeConfig(CompressBase):
    """AWQ 4-bit (GEMM packing) at each group size, plus the RTN baseline at the same bits and group."""

    group_sizes: list[int] = Field(default_factory=lambda: [128], min_length=1,
                                   description="the first is the checkpoint the pipeline serves; each is also measured")
    w_bit: Literal[4] = Field(default=4, description="AWQ's GEMM kernels pack 4-bit weights only")
    zero_point: bool = True
    # Chosen by measurement on the tiny recipe (docs/architecture.md): the paper's scale search
    # s = mean|x|^a without autoawq's extra weight term, with its clipping search.
    duo_scaling: bool = False
    apply_clip: bool = True
    rtn_baseline: bool = True

    @field_validator("group_sizes")
    @classmethod
    def _groups(cls, v: list[int]) -> list[int]:
        bad = [g for g in v if g < 8 or g % 8]
        if bad:
            raise ValueError(f"group sizes must be multiples of 8 and >= 8, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError(f"group sizes repeat: {v}")
        return v

    @model_validator(mode="after")
    def _gemm_needs_zeros(self) -> "QuantizeConfig":
        if not self.zero_point:
            raise ValueError("zero_point: false is not supported: AWQ's GEMM packing (WQLinear_GEMM) stores zero points")
        return self


class SparsifyConfig(CompressBase):
    """Wanda pruning (|W| x input-activation norm) to the listed patterns."""

    patterns: list[Literal["2:4", "unstructured"]] = Field(default_factory=lambda: ["2:4", "unstructured"], min_length=1)
    sparsity: float = Field(default=0.5, gt=0, lt=1, description="fraction pruned by the unstructured pattern")
