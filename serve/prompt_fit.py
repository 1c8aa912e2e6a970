"""Fitting retrieved passages into a local model's context, with that model's tokenizer and
chat template: the gateway does it before the request goes to the model's vLLM replica, so the
prompt that is sent is the one that was measured."""

from __future__ import annotations

from typing import Any

from jobs.vllm_batch import context_length


class PromptFitter:
    def __init__(self, path: str, context: int | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.context = context or context_length(path)

    def chat_tokens(self, messages: list[dict[str, str]]) -> int:
        return len(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def fit(self, messages: list[dict[str, str]], slot: str, pieces: list[str], max_tokens: int) -> dict[str, Any]:
        """Replace `slot` in the last message with as many of `pieces` (blank-line separated, in
        order) as the context holds with `max_tokens` to spare; the first piece that does not fit
        whole is cut at a token boundary. Returns {"messages", "used"} or {"error"}."""
        budget = self.context - max_tokens

        def render(text: str) -> list[dict[str, str]]:
            return [*messages[:-1], {**messages[-1], "content": messages[-1]["content"].replace(slot, text)}]

        def fits(chosen: list[str]) -> bool:
            return self.chat_tokens(render("\n\n".join(chosen))) <= budget

        if not fits([]):
            return {"error": f"the prompt leaves no room in this model's context of {self.context} tokens "
                             f"with max_tokens {max_tokens}"}
        chosen: list[str] = []
        for piece in pieces:
            if fits([*chosen, piece]):
                chosen.append(piece)
                continue
            ids = self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            lo, hi = 0, len(ids)  # the longest prefix that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if fits([*chosen, self.tokenizer.decode(ids[:mid]) + " ..."]):
                    lo = mid
                else:
                    hi = mid - 1
            if lo >= 8:  # a few words at least
                chosen.append(self.tokenizer.decode(ids[:lo]) + " ...")
            break
        return {"messages": render("\n\n".join(chosen)), "used": len(chosen)}
