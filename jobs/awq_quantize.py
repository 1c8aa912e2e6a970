"""AWQ 4-bit quantization with autoawq, made correct on CPU, and its round-to-nearest baseline.

autoawq's scale search snapshots each block's weights with `{k: v.cpu() for k, v in
state_dict()}`: on a GPU that is a copy, on CPU it is the very tensor that the first grid
point then scales in place (`fc.weight.mul_`). Every later grid point starts from corrupted
weights, the search always "wins" at ratio 0, and the chosen scales ignore the calibration
data (with `duo_scaling` they are then applied twice). `CpuSafeAwqQuantizer` gives the search
a real copy; nothing else of autoawq's algorithm changes. `RtnQuantizer` skips the search
(unit scales, no clipping) so the baseline goes through the very same packing and loader.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cluster.errors import UserError

log = logging.getLogger(__name__)


def use_cpu_kernels() -> None:
    """Without CUDA, keep autoawq's packed layers off triton: with triton importable,
    WQLinear_GEMM takes its triton path even on CPU and fails."""
    import awq.modules.linear.gemm as gemm
    import torch

    if not torch.cuda.is_available():
        gemm.TRITON_AVAILABLE = False


def _quantizers():
    """The two quantizer classes; built lazily because importing autoawq is slow and noisy."""
    import torch
    from awq.quantize.quantizer import AwqQuantizer
    from awq.utils.module import get_op_name

    use_cpu_kernels()

    class CpuSafeAwqQuantizer(AwqQuantizer):
        def _compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):
            snapshot = {k: v.detach().clone() for k, v in module2inspect.state_dict().items()}
            module2inspect.state_dict = lambda *a, **k: snapshot  # the search reads its "original" here
            try:
                return super()._compute_best_scale(x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs)
            finally:
                del module2inspect.state_dict

    class RtnQuantizer(AwqQuantizer):
        def _search_best_scale(self, module, prev_op, layers, inp, module2inspect=None, kwargs={}):
            ones = torch.ones(layers[0].weight.shape[1], dtype=layers[0].weight.dtype)
            return get_op_name(module, prev_op), tuple(get_op_name(module, m) for m in layers), ones

    return CpuSafeAwqQuantizer, RtnQuantizer


def check_quantizable(model_dir: Path, group_sizes: list[int], *, apply_clip: bool) -> dict[str, Any]:
    """Every reason AWQ would fail, found before any work: not a causal LM, unsupported
    architecture, already quantized, or a group size that does not divide a layer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
    )

    config = AutoConfig.from_pretrained(model_dir)
    archs = getattr(config, "architectures", None) or []
    causal = any(a in CAUSAL.values() for a in archs) if archs else config.model_type in CAUSAL
    if not causal:
        raise UserError(f"{model_dir} is not a causal language model ({config.model_type}: {archs or 'no architectures'})")
    if getattr(config, "quantization_config", None):
        raise UserError(f"{model_dir} is already quantized ({config.quantization_config.get('quant_method')})")
    from awq.models.auto import AWQ_CAUSAL_LM_MODEL_MAP

    if config.model_type not in AWQ_CAUSAL_LM_MODEL_MAP:
        raise UserError(f"{model_dir}: architecture {config.model_type!r} is not supported by autoawq "
                        f"(supported: {', '.join(sorted(AWQ_CAUSAL_LM_MODEL_MAP))})")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = AWQ_CAUSAL_LM_MODEL_MAP[config.model_type].get_model_layers(model)
    linears = {f"layers.{i}.{n}": m for i, layer in enumerate(layers)
               for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    for g in group_sizes:
        bad = sorted({f"{n} (in {m.in_features})" for n, m in linears.items() if m.in_features % g})
        if bad:
            raise UserError(f"group size {g} does not divide the input size of {len(bad)} layer(s): {', '.join(bad[:4])}")
    # Packing holds 8 int4 per int32 column; the clip search walks output channels in batches of 64.
    step = 64 if apply_clip else 8
    bad = sorted({f"{n} (out {m.out_features})" for n, m in linears.items() if m.out_features % step})
    if bad:
        raise UserError(f"AWQ needs output sizes divisible by {step}: {', '.join(bad[:4])}")
    return {"model_type": config.model_type, "quantized_layers": len(linears),
            "quantized_params": sum(m.in_features * m.out_features for m in linears.values())}


def quantize_awq(model_dir: Path, out_dir: Path, calib, group_size: int, *, zero_point: bool = True,
                 duo_scaling: bool = False, apply_clip: bool = True, search: bool = True) -> Path:
    """Quantize `model_dir` to a 4-bit GEMM AWQ checkpoint in `out_dir` (with tokenizer and chat
    template). `calib` is a LongTensor of token blocks; `search=False` is the RTN baseline."""
    import torch
    from awq import AutoAWQForCausalLM
    from transformers import AutoTokenizer

    awq_cls, rtn_cls = _quantizers()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    model = AutoAWQForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype)
    model.quantize(
        tokenizer,
        quant_config={"zero_point": zero_point, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"},
        calib_data=[row.tolist() for row in calib], max_calib_samples=len(calib), max_calib_seq_len=calib.shape[1],
        duo_scaling=duo_scaling, apply_clip=apply_clip and search,
        quantizer_cls=awq_cls if search else rtn_cls,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_quantized(str(out_dir))
    tokenizer.save_pretrained(out_dir)
    return out_dir
