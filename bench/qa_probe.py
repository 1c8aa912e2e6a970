"""Where the Q&A key span is lost, on a finished run: retrieval, the model's choice, or its writing.

    .venv/bin/python bench/qa_probe.py runs/tiny-cpu [--model grpo] [--items 40]

Builds each held-out reading item's prompt as `POST /v1/qa` does (the qa_index stage's
retriever, k=5, the qa.v2 template, passages fitted into the model's context with its
tokenizer, 48 tokens kept for the answer), then counts the items whose answer holds the
reference's key span (`serve.demo_check.contains_span`) for:

- `in_prompt`: any sentence of the fitted passages (the ceiling any reader of that prompt has);
- `lead_sentence`: the first sentence of the first passage, no model (the reading items'
  answers are built that way, so this shows the task, not a model);
- `generated`: the model's greedy answer with a 0.3 frequency penalty (the served default);
- `chosen`: the model's greedy answer constrained to one of the prompt's sentences (vLLM
  structured outputs, `choice`);
- `ranked`: the sentence with the highest mean token log-probability after the prompt.

Runs vLLM offline (`vllm.LLM`) on this machine's CPU; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
_SLOT = "\x00passages\x00"
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.split(" ".join(text.split())) if len(s.split()) >= 3 and len(s) <= 400]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished run folder (chat_data, qa_index and the model's stage)")
    ap.add_argument("--model", default="grpo", help="the stage whose model answers")
    ap.add_argument("--items", type=int, default=40)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

    from data_jobs.chat_data import numbered
    from serve.demo_check import contains_span, load_qa_items
    from serve.embedder import Embedder
    from serve.prompt_fit import PromptFitter
    from serve.prompt_templates import load_template
    from serve.qa.index import PassageIndex

    model_dir = str(args.run / args.model / "model")
    items = load_qa_items(args.run / "chat_data" / "qa_val.jsonl", args.items)
    index, embedder, fitter = PassageIndex.load(args.run / "qa_index" / "index"), Embedder(), PromptFitter(model_dir)
    template = load_template("qa.v2", needs={"question", "passages"})
    prompts, candidates = [], []
    for item in items:
        hits = [p for p, _ in index.search(embedder.encode([item["question"]])[0], 5)]
        pieces = numbered([(p.title, p.text) for p in hits])
        fitted = fitter.fit(template.messages(question=item["question"], passages=_SLOT), _SLOT, pieces, 48)
        prompts.append(fitter.tokenizer.apply_chat_template(fitted["messages"], add_generation_prompt=True,
                                                            tokenize=False))
        found: list[str] = []
        for p in hits[: fitted["used"]]:
            found += [s for s in sentences(p.text) if s not in found]
        candidates.append(found)

    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(model=model_dir, max_model_len=fitter.context, dtype="float32", enforce_eager=True)
    generated = [o.outputs[0].text for o in llm.generate(
        prompts, SamplingParams(max_tokens=48, temperature=0, frequency_penalty=0.3), use_tqdm=False)]
    chosen, ranked = [], []
    for prompt, cands in zip(prompts, candidates):
        if not cands:
            chosen.append("")
            ranked.append("")
            continue
        chosen.append(llm.generate([prompt], SamplingParams(
            max_tokens=160, temperature=0, structured_outputs=StructuredOutputsParams(choice=cands)),
            use_tqdm=False)[0].outputs[0].text)
        ids = fitter.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        room = fitter.context - len(ids) - 1  # a long sentence is scored on the tokens that fit (and one to generate)
        scored = llm.generate([{"prompt_token_ids": ids + fitter.tokenizer(c, add_special_tokens=False)["input_ids"][:room]}
                               for c in cands], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                              use_tqdm=False)
        means = []
        for out in scored:
            lps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[len(ids):] if d]
            means.append(sum(lps) / max(1, len(lps)))
        ranked.append(cands[max(range(len(cands)), key=means.__getitem__)])

    def share(answers) -> float:
        return round(sum(contains_span(a, it["key_span"]) for a, it in zip(answers, items)) / len(items), 3)

    result = {"run": str(args.run), "model": args.model, "items": len(items),
              "in_prompt": round(sum(any(contains_span(s, it["key_span"]) for s in c)
                                     for c, it in zip(candidates, items)) / len(items), 3),
              "lead_sentence": share([c[0] if c else "" for c in candidates]),
              "generated": share(generated), "chosen": share(chosen), "ranked": share(ranked)}
    for item, g, c in list(zip(items, generated, chosen))[:5]:
        print(f"- {item['question']} | key span: {item['key_span']}\n  generated: {' '.join(g.split())[:120]}"
              f"\n  chosen: {c[:120]}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
