"""The batching engine: iteration-level scheduling of many generations over one shared KV cache.

Written here because nothing maintained does it on CPU: vLLM and TGI need a GPU, and
transformers' continuous batching (`generate_batch`) was slower here than no batching at all
(`../shared/DESIGN.md`), while one plain batched decode step costs about as much as a single
sequence's. So every step decodes all running sequences at once; between steps, new requests
are prefilled (one forward each) and their keys/values join the batch (left-padded, masked),
and finished or cancelled ones leave it. Each sequence keeps its own sampling settings, seed,
stop strings and token budget. The engine is plain torch + transformers, so it runs and is
tested without Ray; the Serve deployment drives it from a thread.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class SamplingParams:
    max_tokens: int = 64
    min_tokens: int = 0  # end-of-sequence tokens are masked until this many were generated
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False  # return the prompt's own log-probabilities (for lm-eval's loglikelihood)
    # OpenAI's penalties on the generated tokens (count-scaled and once-per-token), and vLLM's
    # multiplicative one over prompt and generated tokens; logprobs stay the model's own.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0


@dataclass
class Sequence:
    """One generation. `emit` receives events: {"type": "delta" | "done" | "error", ...}."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[dict[str, Any]], None]
    id: int = field(default_factory=itertools.count().__next__)
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent_chars: int = 0
    finish: str | None = None  # "stop" | "length"
    prompt_logprobs: list[float | None] | None = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)
    generator: Any = None


class BatchKV:
    """Keys/values of the running sequences, per layer [batch, heads, time, dim], left-padded."""

    def __init__(self):
        self.keys: list[Any] = []
        self.values: list[Any] = []
        self.mask = None  # [batch, time] 1 = real token

    @property
    def size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, cache, length: int) -> None:
        import torch
        import torch.nn.functional as F

        new_k = [layer.keys for layer in cache.layers]
        new_v = [layer.values for layer in cache.layers]
        new_mask = torch.ones(1, length, dtype=torch.long)
        if self.mask is None:
            self.keys, self.values, self.mask = new_k, new_v, new_mask
            return
        t_old, t_new = self.mask.shape[1], length
        t = max(t_old, t_new)

        def pad(x, n):  # left-pad the time axis (dim -2 of kv, dim 1 of the mask)
            return x if n == 0 else F.pad(x, (0, 0, n, 0)) if x.dim() == 4 else F.pad(x, (n, 0))

        self.keys = [torch.cat([pad(a, t - t_old), pad(b, t - t_new)]) for a, b in zip(self.keys, new_k)]
        self.values = [torch.cat([pad(a, t - t_old), pad(b, t - t_new)]) for a, b in zip(self.values, new_v)]
        self.mask = torch.cat([pad(self.mask, t - t_old), pad(new_mask, t - t_new)])

    def keep(self, rows: list[int]) -> None:
        import torch

        if not rows:
            self.keys, self.values, self.mask = [], [], None
            return
        idx = torch.tensor(rows)
        mask = self.mask.index_select(0, idx)
        start = int((mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every row
        self.mask = mask[:, start:]
        self.keys = [k.index_select(0, idx)[:, :, start:] for k in self.keys]
        self.values = [v.index_select(0, idx)[:, :, start:] for v in self.values]

    def cache(self):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)))

    def absorb(self, cache) -> None:
        import torch

        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]
        self.mask = torch.cat([self.mask, torch.ones(self.mask.shape[0], 1, dtype=torch.long)], dim=1)


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, stop_token_ids: set[int] | None = None):
        import torch

        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.context = int(getattr(model.config, "max_position_embeddings", 2048))
        eos = model.generation_config.eos_token_id if model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.stop_ids = {i for i in [*eos, tokenizer.eos_token_id, *(stop_token_ids or ())] if i is not None}
        self._stop_columns = torch.tensor(sorted(self.stop_ids))[None, :]  # masked under min_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self.running: list[Sequence] = []
        self.kv = BatchKV()
        self.positions = None  # [batch] next position of each running sequence
        self.last = None  # [batch] last token of each running sequence
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.cancelled = 0  # sequences dropped before their end (client gone)
        self.threads = 0  # intra-op threads the engine thread computes with (known once it runs)

    # ---- public, thread-safe ----
    def submit(self, seq: Sequence) -> Sequence:
        if len(seq.prompt_ids) == 0:
            raise ValueError("empty prompt")
        if len(seq.prompt_ids) + seq.params.max_tokens > self.context:
            raise ValueError(f"prompt ({len(seq.prompt_ids)} tokens) + max_tokens ({seq.params.max_tokens}) "
                             f"is over the context length ({self.context})")
        with self._wake:
            self.waiting.append(seq)
            self._wake.notify()
        return seq

    def queue_length(self) -> int:
        return len(self.waiting)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="aero-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- the loop ----
    def _loop(self) -> None:
        import torch

        self.threads = torch.get_num_threads()
        while not self._stop.is_set():
            try:
                with self._wake:
                    while not self.running and not self.waiting and not self._stop.is_set():
                        self._wake.wait(0.5)
                self.step()
            except Exception as exc:  # a failed step fails its sequences, never the replica
                log.exception("engine step failed")
                for seq in self.running:
                    seq.emit({"type": "error", "message": f"generation failed: {exc}"})
                self.running, self.kv, self.positions, self.last = [], BatchKV(), None, None

    def step(self) -> None:
        """Admit waiting sequences (prefill), then one decode step for all running ones."""
        import torch

        # Grad mode is per thread: the engine thread must switch autograd off itself.
        with torch.no_grad():
            self._step()

    def _step(self) -> None:
        import torch

        while len(self.running) < self.max_batch and self.waiting:
            with self._wake:
                seq = self.waiting.popleft()
            if seq.cancelled:
                continue
            try:
                self._prefill(seq)
            except Exception as exc:  # this request fails alone; the running batch is untouched
                log.exception("prefill failed")
                seq.emit({"type": "error", "message": f"generation failed: {exc}"})
        self._drop_finished()
        if not self.running:
            return
        out = self.model(input_ids=self.last[:, None], attention_mask=torch.cat(
            [self.kv.mask, torch.ones(self.kv.size, 1, dtype=torch.long)], dim=1),
            position_ids=self.positions[:, None], cache=self.kv.cache(), use_cache=True)
        self.kv.absorb(out.cache)
        self.positions = self.positions + 1
        logits = self._mask_early_stops(out.logits[:, -1, :].float(), self.running)
        greedy = logits.argmax(-1).tolist()  # one op for the batch, not one per sequence
        tokens = [self._next(seq, logits[i], greedy[i]) for i, seq in enumerate(self.running)]
        self.last = torch.tensor(tokens)
        self.steps += 1
        self._drop_finished()

    def _prefill(self, seq: Sequence) -> None:
        import torch

        seq.generator = torch.Generator().manual_seed(seq.params.seed if seq.params.seed is not None
                                                      else int(torch.randint(0, 2**62, (1,))))
        ids = torch.tensor([seq.prompt_ids])
        out = self.model(input_ids=ids, use_cache=True)
        if seq.params.echo:
            logp = torch.log_softmax(out.logits[0, :-1].float(), dim=-1)
            seq.prompt_logprobs = [None] + logp.gather(1, ids[0, 1:, None])[:, 0].tolist()
        logits = self._mask_early_stops(out.logits[0, -1:].float(), [seq])
        token = self._next(seq, logits[0], int(logits[0].argmax()))
        self.kv.add(out.cache, len(seq.prompt_ids))
        pos = torch.tensor([len(seq.prompt_ids)])
        last = torch.tensor([token])
        self.positions = pos if self.positions is None else torch.cat([self.positions, pos])
        self.last = last if self.last is None else torch.cat([self.last, last])
        self.running.append(seq)

    def _mask_early_stops(self, logits, seqs: list[Sequence]):
        """End-of-sequence tokens masked (in place, [batch, vocab]) for the rows still under
        their `min_tokens`."""
        import torch

        rows = [i for i, s in enumerate(seqs) if len(s.generated) < s.params.min_tokens]
        if rows and self.stop_ids:
            logits[torch.tensor(rows)[:, None], self._stop_columns] = float("-inf")
        return logits

    @staticmethod
    def _penalized(logits, seq: Sequence):
        """`logits` after the sequence's frequency/presence/repetition penalties (vLLM's semantics)."""
        import torch

        p, out = seq.params, logits.clone()
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted({*seq.prompt_ids, *seq.generated}), dtype=torch.long)
            v = out[seen]
            out[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if seq.generated and (p.frequency_penalty or p.presence_penalty):
            ids, counts = torch.tensor(seq.generated, dtype=torch.long).unique(return_counts=True)
            out[ids] -= p.frequency_penalty * counts.to(out.dtype) + p.presence_penalty
        return out

    def _next(self, seq: Sequence, logits, greedy: int) -> int:
        """Sample one token for `seq` (`greedy`: the argmax of its `logits`), record it, emit
        its text; marks `seq` done when it ends."""
        import torch

        p = seq.params
        scores = logits
        if p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0:
            scores = self._penalized(logits, seq)
            greedy = int(scores.argmax())
        if p.temperature <= 0:
            token = greedy
        else:
            probs = torch.softmax(scores / p.temperature, dim=-1)
            if p.top_p < 1.0:
                sorted_p, order = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        info = None
        if p.logprobs:
            logp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logp, p.top_logprobs) if p.top_logprobs else None
            info = {"id": token, "logprob": float(logp[token]),
                    "top": list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []}
        if token in self.stop_ids:
            seq.finish = "stop"
            self._flush(seq, final=True)
            return token
        seq.generated.append(token)
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        for s in p.stop:
            cut = text.find(s)
            if cut >= 0:
                seq.finish, seq.text = "stop", text[:cut]
                self._flush(seq, final=True, tokens=[info] if info else [])
                return token
        seq.text = text
        if len(seq.generated) >= p.max_tokens:
            seq.finish = "length"
        self._flush(seq, final=seq.finish is not None, tokens=[info] if info else [])
        return token

    def _flush(self, seq: Sequence, *, final: bool, tokens: list | None = None) -> None:
        text = seq.text
        # Hold back a tail that could still become a stop string, and an unfinished UTF-8 character.
        hold = 0 if final else max((len(s) - 1 for s in seq.params.stop), default=0)
        settled = len(text) if final else len(text.rstrip("\ufffd"))
        upto = max(seq.sent_chars, min(settled, len(text) - hold))
        delta = text[seq.sent_chars: upto]
        seq.sent_chars = upto
        if delta or tokens:
            seq.emit({"type": "delta", "text": delta, "tokens": tokens or []})
        if final:
            seq.emit({"type": "done", "finish_reason": seq.finish, "prompt_tokens": len(seq.prompt_ids),
                      "completion_tokens": len(seq.generated), "prompt_logprobs": seq.prompt_logprobs})

    def _drop_finished(self) -> None:
        keep = [i for i, s in enumerate(self.running) if not s.cancelled and s.finish is None]
        if len(keep) == len(self.running):
            return
        self.cancelled += sum(1 for s in self.running if s.cancelled and s.finish is None)
        self.running = [self.running[i] for i in keep]
        self.kv.keep(keep)
        self.positions = self.positions[keep] if keep else None
        self.last = self.last[keep] if keep else None
