"""Does a small Llama learn to copy a passage's sentence within a CPU budget, given copy-shaped data?

    .venv/bin/python bench/copy_probe.py runs/tiny-cpu --steps 1500 --copy 0.9
    .venv/bin/python bench/copy_probe.py runs/tiny-cpu --steps 1200 --copy 1.0 --init runs/tiny-cpu/pretrain/model --lr 1e-3
    .venv/bin/python bench/copy_probe.py runs/tiny-cpu --steps 1500 --copy 0.5 --shuffle
    .venv/bin/python bench/copy_probe.py runs/tiny-cpu --steps 600 --copy 0.4 --induction 0.3 --induction-steps 200 --anchor

The Q&A goal of issue 26 needs the model to copy a sentence from a passage in its prompt. This
trains the tiny preset's shape (or `--hidden`/`--layers`) with plain PyTorch on one process, on
a mix of the run's training documents (256-token windows) and copy items:
`Passages:\\n[1] TITLE: PASSAGE\\n\\nQuestion: ...\\nAnswer: FIRST SENTENCE` over random
sentence windows, loss on the answer only. `--shuffle` shuffles each training passage's words,
so its sentences cannot be memorized and only copying lowers the loss. `--anchor` makes the
answer `[1] TITLE: FIRST SENTENCE`, the passage's own opening, so every answer token follows
a copy of the token before it (what an induction head does). `--induction` mixes in rows of
random tokens repeated (a 128-token segment twice, loss on the repeat: only copying lowers it),
and `--induction-steps N` trains on those alone for the first N steps. Every sixth of the run
it prints, on 40 copy items from the run's held-out documents: teacher-forced accuracy on
the answer tokens and the share of greedy answers (48 tokens) holding the sentence's first 8 words.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run with finished data and tokenizer stages")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--copy", type=float, default=0.5, help="share of copy items in each batch")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--init", help="start from this model folder instead of from scratch")
    ap.add_argument("--shuffle", action="store_true", help="shuffle the words of training passages")
    ap.add_argument("--induction", type=float, default=0.0,
                    help="share of each batch that is random tokens repeated (a segment, then the same segment)")
    ap.add_argument("--induction-steps", type=int, default=0,
                    help="first train this many steps on repeated random tokens only, then the mix")
    ap.add_argument("--anchor", action="store_true",
                    help="answers start by citing the passage as the prompt lists it (`[1] TITLE: ...`)")
    args = ap.parse_args()

    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.run / "tokenizer" / "tokenizer")
    docs = [d for f in sorted((args.run / "data" / "documents").glob("*.parquet")) for d in pq.read_table(f).to_pylist()]
    train = [d for d in docs if d["split"] == "train"]
    val = [d for d in docs if d["split"] == "val" and d["kind"] == "prose"]
    stream = [i for d in train for i in tok(d["text"])["input_ids"] + [tok.eos_token_id]]
    seq = 256
    rng = random.Random(0)

    def sentences(text: str) -> list[str]:
        return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if len(s.split()) >= 5 and len(s) <= 200]

    def copy_item(pool: list[dict], r: random.Random, shuffle: bool) -> tuple[str, str, str]:
        """(prompt, answer, the sentence to copy)."""
        while True:
            d = r.choice(pool)
            found = sentences(d["text"])
            if len(found) >= 3:
                break
        i = r.randrange(len(found) - 1)
        window = found[i:i + 6]
        if shuffle:
            window = [" ".join(r.sample(s.split(), len(s.split()))) for s in window]
        title = d["text"].split("\n")[0][:40]
        question = r.choice(["What is this about?", "What does it say?", "Explain it."])
        answer = f"\n[1] {title}: {window[0]}" if args.anchor else " " + window[0]
        return f"Passages:\n[1] {title}: {' '.join(window)[:600]}\n\nQuestion: {question}\nAnswer:", answer, window[0]

    def encode(prompt: str, answer: str) -> tuple[list[int], list[int]]:
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return (p + a)[:seq], ([-100] * len(p) + a)[:seq]

    def batch(n: int, step: int):
        xs, ys = [], []
        for _ in range(n):
            roll = rng.random()
            if step <= args.induction_steps or roll < args.induction:
                half = [rng.randrange(100, len(tok)) for _ in range(seq // 2)]
                ids = half + half
                labels = [-100] * (seq // 2) + half
            elif roll < args.induction + args.copy:
                ids, labels = encode(*copy_item(train, rng, args.shuffle)[:2])
            else:
                s = rng.randrange(len(stream) - seq)
                ids = stream[s:s + seq]
                labels = list(ids)
            pad = seq - len(ids)
            xs.append(ids + [0] * pad)
            ys.append(labels + [-100] * pad)
        return torch.tensor(xs), torch.tensor(ys)

    if args.init:
        model = LlamaForCausalLM.from_pretrained(args.init)
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq,
            pad_token_id=0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    held_rng = random.Random(1)
    held = [copy_item(val, held_rng, False) for _ in range(40)]

    @torch.no_grad()
    def evaluate() -> tuple[float, float, str]:
        model.eval()
        hits, right, total, text = 0, 0, 0, ""
        for prompt, answer, sentence in held:
            ids, labels = encode(prompt, answer)
            logits = model(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            mask = target != -100
            right += (logits.argmax(-1)[mask] == target[mask]).sum().item()
            total += mask.sum().item()
            p = tok(prompt)["input_ids"]
            out = model.generate(torch.tensor([p]), max_new_tokens=48, do_sample=False, pad_token_id=0)
            text = tok.decode(out[0, len(p):], skip_special_tokens=True)
            hits += " ".join(sentence.split()[:8]).lower() in " ".join(text.lower().split())
        model.train()
        return hits / len(held), right / total, text

    start = time.time()
    for step in range(1, args.steps + 1):
        x, y = batch(16, step)
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % max(1, args.steps // 6) == 0 or step == args.steps:
            span, acc, sample = evaluate()
            print(f"step {step} loss {loss.item():.3f} held-out key span {span:.3f} copy token accuracy {acc:.3f} "
                  f"{time.time() - start:.0f} s | last answer: {sample[:80]!r}", flush=True)


if __name__ == "__main__":
    main()
