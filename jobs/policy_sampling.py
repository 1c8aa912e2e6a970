"""Answers sampled from a policy, their log-probabilities and reward-model scores: what the
`eval` stage compares policies with, and what the `dpo` stage's sampled pairs are made of (so
both read answers the same way: the chat template, the end-of-turn stop, the model's context).

Hand-written batching over transformers' `generate` because the answers are short and few
(hundreds) on small recipes, where a serving engine's start costs more than the answers; the
`eval` stage takes its answers from vLLM on Ray Data LLM instead when `eval.vllm` is set
(the GPU recipes).
"""

from __future__ import annotations

from typing import Any

Messages = list[dict[str, str]]


def end_of_turn(tokenizer) -> list[int]:
    """Token ids that end an assistant answer: the template's `<|im_end|>` and EOS."""
    return [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]


def sample_answers(model, tokenizer, prompts: list[Messages], *, samples: int, temperature: float,
                   max_new_tokens: int, seed: int, batch: int = 8) -> list[str]:
    """`samples` answers per prompt (prompt-major), each cut to the room the context leaves;
    seeded so that two policies' answers differ only by their weights. Temperature 0: greedy."""
    import torch

    torch.manual_seed(seed)
    asked = [p for p in prompts for _ in range(samples)]
    sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature, "top_p": 1.0}
                                if temperature > 0 else {"do_sample": False})
    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(asked), batch):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in asked[i:i + batch]]
        enc = tokenizer(texts, add_special_tokens=False, return_tensors="pt", padding=True).to(model.device)
        room = model.config.max_position_embeddings - enc["input_ids"].shape[1]
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max(1, min(max_new_tokens, room)), **sampling,
                                 eos_token_id=end_of_turn(tokenizer), pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return out


def answer_logprob(model, tokenizer, prompt: Messages, answer: str) -> tuple[float, int]:
    """Sum of log-probabilities of the answer (+ end of turn) after the templated prompt."""
    import torch

    prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    a_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p_ids + a_ids])[:, : model.config.max_position_embeddings]
    with torch.no_grad():
        logits = model(input_ids=ids.to(model.device)).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None].to(logits.device))[:, 0]
    answer_part = logp[len(p_ids) - 1:]
    return float(answer_part.sum()), len(answer_part)


def reward_input_ids(tokenizer, prompt: Messages, answer: str, context: int) -> list[int]:
    """What a reward model reads for one answer to one prompt: the chat, truncated to its context."""
    text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=False)
    return tokenizer(text, add_special_tokens=False, truncation=True, max_length=context)["input_ids"]


def reward_score(rm, tokenizer, prompt: Messages, answer: str) -> float:
    """The reward model's scalar for one answer to one prompt."""
    import torch

    ids = torch.tensor([reward_input_ids(tokenizer, prompt, answer, rm.config.max_position_embeddings)], device=rm.device)
    with torch.no_grad():
        return float(rm(input_ids=ids).logits[0, 0])


def ranked_pairs(policy: str, reward_model: str, prompts: list[Messages], *, samples: int, temperature: float,
                 max_new_tokens: int, min_gap: float, seed: int, threads: int = 1) -> dict[str, Any]:
    """DPO pairs from the policy's own answers: per prompt, `samples` answers scored by the reward
    model, chosen = the best that does not loop (jobs/text_quality.degenerate), rejected = the
    worst, kept when their score gap is above `min_gap` (ties and identical answers teach
    nothing); a prompt whose answers all loop gives no pair. Runs as a Ray task of the `dpo` stage."""
    import statistics

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from jobs.awq_loader import load_causal_lm

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(policy, device=device)
    tok = AutoTokenizer.from_pretrained(policy)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval().to(device)
    rm_tok = AutoTokenizer.from_pretrained(reward_model)
    answers = sample_answers(model, tok, prompts, samples=samples, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed)
    from jobs.text_quality import degenerate

    pairs, gaps, close, looping = [], [], 0, 0
    for k, prompt in enumerate(prompts):
        own = answers[k * samples:(k + 1) * samples]
        scored = sorted((reward_score(rm, rm_tok, prompt, a), a) for a in own)
        fluent = [(s, a) for s, a in scored if not degenerate(a)]  # a loop is never the chosen answer
        if not fluent:
            looping += 1
            continue
        (low, worst), (high, best) = scored[0], fluent[-1]
        if best == worst or high - low <= min_gap:
            close += 1
            continue
        gaps.append(high - low)
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": best}],
                      "rejected": [{"role": "assistant", "content": worst}],
                      "chosen_score": high, "rejected_score": low})
    return {"pairs": pairs, "stats": {"prompts": len(prompts), "pairs": len(pairs), "too_close": close,
                                      "all_answers_loop": looping,
                                      "mean_score_gap": statistics.fmean(gaps) if gaps else 0.0}}
