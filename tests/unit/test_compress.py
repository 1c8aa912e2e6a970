"""`aero quantize` refuses bad models and group sizes before any work."""

from __future__ import annotations


import pytest

from cluster.errors import ConfigError, UserError
from tests.conftest import BASE, recipe


def test_quantize_rejects_bad_models_and_group_sizes_before_any_work(tmp_path):
    from transformers import BertConfig, GPT2Config, LlamaConfig

    from jobs.awq_quantize import check_quantizable

    BertConfig(architectures=["BertForMaskedLM"]).save_pretrained(tmp_path / "bert")
    GPT2Config(architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path / "gpt2")
    LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path / "llama96")
    cases = {
        tmp_path / "missing": "no config.json",
        tmp_path / "bert": "is not a causal language model (bert",
        tmp_path / "gpt2": "architecture 'gpt2' is not supported by autoawq",
        tmp_path / "llama96": "group size 128 does not divide the input size of",
    }
    for folder, message in cases.items():
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            check_quantizable(folder, [128], apply_clip=True)
    with pytest.raises(ConfigError, match="zero_point"):
        recipe(tmp_path, quantize={**BASE["quantize"], "zero_point": False})
    with pytest.raises(ConfigError, match="multiples of 8"):
        recipe(tmp_path, quantize={**BASE["quantize"], "group_sizes": [100]})


