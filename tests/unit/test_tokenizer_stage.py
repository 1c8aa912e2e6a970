"""The tokenizer: a byte-level BPE that round-trips any text, the one chat template, and packing."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from data_jobs.packing import pack_ids
from data_jobs.tokenizer_stage import TokenizerConfig, train_tokenizer

SAMPLES = [
    "Tiếng Việt có dấu: người, đường, nghiêng, Hà Nội, Nguyễn.",
    "def f(x):\n\tif x:\n\t\treturn  x  # two spaces\n    return None\n",
    "Mixed: naïve café, 東京, emoji 🚀, math ∑ and a trailing space ",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(["ray", "data", "train", "model", "người", "đường", "def", "return"]) for _ in range(200)) for _ in range(50)]
    train_tokenizer(iter(corpus + SAMPLES), TokenizerConfig(vocab_size=400), out)
    return AutoTokenizer.from_pretrained(str(out))


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_special_tokens_and_chat_template(tokenizer):
    assert tokenizer.bos_token == "<|bos|>" and tokenizer.eos_token == "<|eos|>" and tokenizer.pad_token == "<|pad|>"
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Chào bạn"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nChào bạn<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in list(ids)


def test_pack_ids_appends_eos_and_counts_the_tail():
    seqs, dropped = pack_ids([[1, 2, 3], [4, 5], [6]], eos_id=0, seq_len=4)
    assert seqs.tolist() == [[1, 2, 3, 0], [4, 5, 0, 6]] and dropped == 1
    seqs, dropped = pack_ids([[1]], eos_id=0, seq_len=4)
    assert seqs.shape == (0, 4) and dropped == 2


