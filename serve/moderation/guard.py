"""Optional guard-model layer: ask a local causal LM in the Llama Guard prompt format whether a
conversation turn is safe, and map its S-codes (MLCommons hazard taxonomy, as Llama Guard 3
prints them) to our categories. Any model folder that `jobs.awq_loader.load_causal_lm` reads
works; an answer that is not `safe` / `unsafe` + codes is counted, not trusted.
"""

from __future__ import annotations

import re

# Llama Guard 3 hazard codes -> our categories (codes with no counterpart map to nothing).
S_CODES = {
    "S1": "illicit/violent", "S2": "illicit", "S3": "sexual", "S4": "sexual/minors", "S5": "harassment",
    "S7": "pii", "S9": "illicit/violent", "S10": "hate", "S11": "self-harm", "S12": "sexual",
    "S14": "prompt_injection",
}
_HAZARDS = """S1: Violent Crimes.
S2: Non-Violent Crimes.
S3: Sex Crimes.
S4: Child Exploitation.
S5: Defamation.
S6: Specialized Advice.
S7: Privacy.
S8: Intellectual Property.
S9: Indiscriminate Weapons.
S10: Hate.
S11: Self-Harm.
S12: Sexual Content.
S13: Elections.
S14: Code Interpreter Abuse."""


def guard_prompt(text: str, direction: str) -> str:
    role = "Agent" if direction == "output" else "User"
    return (
        f"Task: Check if there is unsafe content in '{role}' messages in conversations according to our safety "
        f"policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{_HAZARDS}\n"
        f"<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{role}: {text}\n\n<END CONVERSATION>\n\n"
        f"Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
        f" - First line must read 'safe' or 'unsafe'.\n"
        f" - If unsafe, a second line must include a comma-separated list of violated categories."
    )


def parse_answer(answer: str) -> list[str] | None:
    """'safe' -> []; 'unsafe\\nS1,S10' -> our categories; anything else -> None (unparsed)."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if not lines:
        return None
    if lines[0].lower() == "safe":
        return []
    if lines[0].lower() != "unsafe":
        return None
    codes = re.findall(r"S\d{1,2}", lines[1]) if len(lines) > 1 else []
    return sorted({S_CODES[c] for c in codes if c in S_CODES}) or ["illicit"]


class Guard:
    def __init__(self, model_dir: str, max_new_tokens: int = 12):
        import torch
        from transformers import AutoTokenizer

        from jobs.awq_loader import load_causal_lm

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = load_causal_lm(model_dir).eval()
        self.max_new_tokens = max_new_tokens
        self.calls = self.unparsed = 0

    def categories(self, text: str, direction: str) -> list[str]:
        chat = [{"role": "user", "content": guard_prompt(text, direction)}]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                                     return_dict=True)["input_ids"]
        else:
            ids = self.tokenizer(chat[0]["content"], return_tensors="pt")["input_ids"]
        room = getattr(self.model.config, "max_position_embeddings", 4096) - self.max_new_tokens
        ids = ids[:, -room:]  # a small guard model keeps the end: the text's tail and the question
        with self.torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        self.calls += 1
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        found = parse_answer(answer)
        if found is None:
            self.unparsed += 1
            return []
        return found
