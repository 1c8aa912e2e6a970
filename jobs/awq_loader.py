"""Load a standard AWQ checkpoint (`quant_method: awq`, GEMM packing) on any device, CPU included.

autoawq's `from_quantized` demands intel_extension_for_pytorch on CPU (it pins an older torch)
and transformers 5 loads AWQ only through gptqmodel (a CUDA build), so neither runs here. This
loader unpacks the int4 weights once with autoawq's own pure-torch `dequantize_gemm` and builds
the plain transformers model class from the same config: the checkpoint stays the one vLLM, TGI
and transformers load on GPU; on CPU it costs fp32 memory but runs at fp32 matmul speed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.errors import UserError

AWQ_SUFFIXES = (".qweight", ".qzeros", ".scales")


def awq_settings(path: Path) -> dict[str, Any] | None:
    """The checkpoint's `quantization_config` when it is AWQ, else None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        raise UserError(f"{path} is not a Hugging Face model folder (no config.json)")
    q = json.loads(config.read_text()).get("quantization_config")
    return q if q and q.get("quant_method") == "awq" else None


def _state_dict(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} holds no .safetensors weights")
    state: dict[str, Any] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def dequantize_state(state: dict[str, Any], bits: int, group_size: int, dtype) -> dict[str, Any]:
    """Replace each packed layer's (qweight, qzeros, scales) by its dense `weight`."""
    import awq.modules.linear.gemm  # noqa: F401  (autoawq's import-time setup)
    from awq.utils.packing_utils import dequantize_gemm

    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if not k.endswith(AWQ_SUFFIXES)}
    for key in [k for k in state if k.endswith(".qweight")]:
        layer = key[: -len(".qweight")]
        qweight, qzeros, scales = state[key], state.get(f"{layer}.qzeros"), state.get(f"{layer}.scales")
        if qzeros is None or scales is None:
            raise UserError(f"AWQ layer {layer} lacks qzeros or scales")
        in_features = qweight.shape[0]
        if in_features % group_size or scales.shape[0] * group_size != in_features:
            raise UserError(
                f"AWQ layer {layer}: group size {group_size} does not divide its input size {in_features} "
                f"(scales hold {scales.shape[0]} groups)"
            )
        out[f"{layer}.weight"] = dequantize_gemm(qweight, qzeros, scales.float(), bits, group_size).t().contiguous().to(dtype)
    return out


def load_awq(path: str | Path, *, dtype=None, device: str = "cpu"):
    """An AWQ checkpoint as a ready `AutoModelForCausalLM` with dense weights, in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    q = awq_settings(path)
    if q is None:
        raise UserError(f"{path} is not an AWQ checkpoint (config.json has no quantization_config with quant_method: awq)")
    version = str(q.get("version", "")).lower()
    if version != "gemm" or int(q.get("bits", 0)) != 4:
        raise UserError(f"{path}: only 4-bit GEMM AWQ checkpoints load here (found bits={q.get('bits')}, version={version})")
    dtype = dtype or torch.float32
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # else transformers routes the load to its AWQ backend (gptqmodel)
    config.use_cache = True  # autoawq saves use_cache: false (calibration); generation wants the KV cache
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dequantize_state(_state_dict(path), int(q["bits"]), int(q["group_size"]), dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()


def load_causal_lm(path: str | Path, *, dtype=None, device: str = "cpu"):
    """Any exported model folder, fp or AWQ: the one loader serving and the quality table use."""
    import torch
    from transformers import AutoModelForCausalLM

    if awq_settings(Path(path)) is not None:
        return load_awq(path, dtype=dtype, device=device)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
