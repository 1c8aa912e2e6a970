"""Model compression on CPU: AWQ 4-bit (autoawq) with the RTN baseline, the CPU loader, Wanda
2:4 and unstructured sparsity, and `aero quantize`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import aero


def _blocks(run: Path, split: str, n: int):
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    index = json.loads((run / "tokenizer/index.json").read_text())
    table = pads.dataset(index["splits"][split]["path"], format="parquet").head(n, columns=["input_ids"])
    return torch.from_numpy(np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype("int64"))


@pytest.mark.slow
def test_awq_checkpoint_is_standard_loads_on_cpu_and_generates(post_run):
    from transformers import AutoTokenizer

    from jobs.awq_loader import load_causal_lm

    folder = post_run / "quantize" / "awq-g128"
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["version"], config["bits"], config["group_size"]) == ("awq", "gemm", 4, 128)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    model = load_causal_lm(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Explain lists"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6


@pytest.mark.slow
def test_the_cpu_loader_matches_autoawqs_own_packed_layer(post_run):
    """Dequantize-at-load gives the same outputs as autoawq's WQLinear_GEMM on the packed tensors."""
    import torch
    from awq.modules.linear.gemm import WQLinear_GEMM
    from safetensors.torch import load_file

    from jobs.awq_loader import load_causal_lm
    from jobs.awq_quantize import use_cpu_kernels

    use_cpu_kernels()
    folder = post_run / "quantize" / "awq-g32"
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    packed = WQLinear_GEMM(4, 32, state[f"{name}.qweight"].shape[0], state[f"{name}.scales"].shape[1], False, "cpu")
    packed.load_state_dict({k: state[f"{name}.{k}"] for k in ("qweight", "qzeros", "scales")})
    dense = load_causal_lm(folder).get_submodule(name)
    x = torch.randn(3, dense.in_features)
    with torch.no_grad():
        assert torch.allclose(packed(x).float(), dense(x), atol=2e-2, rtol=2e-2)


@pytest.mark.slow
def test_quant_table_compares_awq_rtn_and_sparse_on_the_same_text(post_run):
    result = json.loads((post_run / "quantize/quant.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    assert set(rows) == {"fp32", "awq-g128", "rtn-g128", "awq-g32", "rtn-g32", "sparse-2of4", "sparse-unstructured"}
    sparse = json.loads((post_run / "sparsify/sparsify.json").read_text())
    assert result["eval_tokens"] == sparse["eval_tokens"] == 8 * 128  # every row: the same held-out blocks
    assert result["calib_tokens"] == 8 * 128
    assert result["fp_ppl"] == pytest.approx(sparse["rows"][0]["ppl"])
    for g in ("128", "32"):
        fig = result["by_group"][g]
        assert fig["awq_size_vs_fp16"] <= 0.35
        assert fig["awq_vs_fp"] < 1.2 and fig["awq_vs_rtn"] < 1.1, fig
    assert rows["awq-g128"]["weights_mb"] < rows["fp32"]["weights_mb"]
    assert all(r["gen_tokens_per_s"] > 0 and r["load_s"] > 0 for r in rows.values())
    assert "| awq-g32 | AWQ W4 | 32 |" in (post_run / "quantize/quant.md").read_text()


@pytest.mark.slow
def test_awq_uses_its_calibration_and_rtn_does_not(post_run, tmp_path):
    from safetensors.torch import load_file

    from jobs.awq_quantize import quantize_awq

    model = post_run / "pretrain" / "model"
    held_out, train = _blocks(post_run, "val", 8), _blocks(post_run, "train", 8)

    def scales(calib, search):
        out = quantize_awq(model, tmp_path / f"{search}-{len(list(tmp_path.iterdir()))}", calib, 128, search=search)
        state = load_file(str(out / "model.safetensors"))
        return {k: v for k, v in state.items() if k.endswith((".scales", ".qweight")) or "norm" in k}

    awq_a, awq_b = scales(held_out, True), scales(train, True)
    assert any(not (awq_a[k] == awq_b[k]).all() for k in awq_a), "AWQ ignored its calibration data"
    rtn_a, rtn_b = scales(held_out, False), scales(train, False)
    assert all((rtn_a[k] == rtn_b[k]).all() for k in rtn_a)


@pytest.mark.slow
def test_wanda_2of4_leaves_exactly_two_zeros_in_every_group_of_four(post_run):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    original = load_file(str(post_run / "pretrain" / "model" / "model.safetensors"))
    for folder, check in (("sparse-2of4", "2:4"), ("sparse-unstructured", "half")):
        state = load_file(str(post_run / "sparsify" / folder / "model.safetensors"))
        pruned = {k: v for k, v in state.items() if k.startswith("model.layers.") and k.endswith("proj.weight")}
        assert len(pruned) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
        for key, w in pruned.items():
            if check == "2:4":
                zeros = (w.reshape(w.shape[0], -1, 4) == 0).sum(-1)
                assert (zeros == 2).all(), key
            else:
                assert ((w == 0).sum(1) == w.shape[1] // 2).all(), key
        assert torch.equal(state["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # not pruned
        AutoModelForCausalLM.from_pretrained(post_run / "sparsify" / folder)
    rows = json.loads((post_run / "sparsify/sparsify.json").read_text())["rows"]
    assert [r["sparsity"] for r in rows[1:]] == [0.5, 0.5]
    assert all(r["ppl"] < 2 * rows[0]["ppl"] for r in rows[1:])
    assert torch.isfinite(torch.tensor([r["ppl"] for r in rows])).all()


@pytest.mark.slow
def test_aero_quantize_a_model_folder_with_text_calibration(post_run, tmp_path):
    text = tmp_path / "calib.md"
    text.write_text("\n\n".join(f"Section {i}: lists, dicts and sets keep Python data." for i in range(400)))
    model = post_run / "pretrain" / "model"
    common = ["quantize", str(model), "--runs-dir", str(tmp_path / "runs"), "--run", "q"]
    few = aero(*common, "--calibration", str(text), "calibration.min_calib_tokens=1000000")
    assert few.returncode == 2 and "too little calibration text" in few.stderr, few.stderr[-2000:]
    missing = aero(*common, "--calibration", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr

    ok = aero(*common, "--calibration", str(text), "group_sizes=[64]", "rtn_baseline=false",
              "calibration.calib_sequences=4", "calibration.eval_sequences=4", "calibration.seq_len=64",
              "calibration.min_calib_tokens=256", "gen_tokens=4", "gen_prompts=1", "cpus=1", timeout=600)
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-3000:]
    result = json.loads((tmp_path / "runs/q/quantize/quant.json").read_text())
    assert result["calibration"].startswith("1 text source") and result["calib_tokens"] == 4 * 64
    assert [r["name"] for r in result["rows"]] == ["fp32", "awq-g64"]
    assert "| awq-g64 | AWQ W4 | 64 |" in ok.stdout

