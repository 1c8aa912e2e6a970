"""The engine's frequency, presence and repetition penalties (vLLM's semantics), checked against
transformers' own repetition penalty and a plain reference loop; no Ray."""

from __future__ import annotations

import pytest


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=128, eos_token_id=96)).eval()


class Tok:  # the engine needs decode only
    eos_token_id = 96

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(chr(65 + i % 58) for i in ids)


def _greedy(model, prompt: list[int], n: int, **penalties) -> list[int]:
    from serve.engine import Engine, SamplingParams, Sequence

    engine = Engine(model, Tok(), max_batch=2)
    seq = engine.submit(Sequence(prompt_ids=prompt, params=SamplingParams(max_tokens=n, temperature=0, **penalties),
                                 emit=lambda e: None))
    while engine.running or engine.waiting:
        engine.step()
    return seq.generated


def test_repetition_penalty_matches_transformers_generate():
    import torch

    model, prompt = _model(), [5, 9, 5, 9, 5, 9, 12]
    ours = _greedy(model, prompt, 16, repetition_penalty=1.8)
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, repetition_penalty=1.8,
                         eos_token_id=96, pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == ref
    assert ours != _greedy(model, prompt, 16)  # the penalty changed what greedy decoding says


@pytest.mark.parametrize("frequency, presence", [(1.5, 0.0), (0.0, 1.5), (0.7, 0.4)])
def test_frequency_and_presence_penalties_match_a_reference_loop(frequency, presence):
    from collections import Counter

    import torch

    model, prompt = _model(), [3, 1, 4, 1, 5]
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(20):
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
            for token, count in Counter(out).items():  # generated tokens only, not the prompt
                logits[token] -= frequency * count + presence
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    plain = _greedy(model, prompt, 20)
    ours = _greedy(model, prompt, 20, frequency_penalty=frequency, presence_penalty=presence)
    assert ours == out
    assert len(set(ours)) > len(set(plain))  # more distinct tokens than plain greedy, which repeats itself
