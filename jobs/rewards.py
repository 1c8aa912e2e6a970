"""Rule rewards that GRPO can add to the reward model's score (named in `grpo.rule_rewards`).

Each takes TRL's reward-function arguments (`completions`, conversational or plain text) and
returns one float per completion, in [-1, 1].
"""

from __future__ import annotations

from typing import Any, Callable


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return "".join(m.get("content", "") for m in completion)
    return str(completion)


def no_repetition(completions: list, **_: Any) -> list[float]:
    """1 minus twice the share of repeated word trigrams: loops of the same phrase score low."""
    scores = []
    for c in completions:
        words = _text(c).split()
        grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
        scores.append(1.0 - 2.0 * (1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return scores


def ends_cleanly(completions: list, **_: Any) -> list[float]:
    """1 when the answer ends at a sentence or line end, else -1 (cut off by the length limit)."""
    return [1.0 if _text(c).rstrip().endswith((".", "!", "?", ":", ")", "\n")) else -1.0 for c in completions]


def length(completions: list, **_: Any) -> list[float]:
    """Prefers answers of 20-80 words; empty ones get -1."""
    out = []
    for c in completions:
        n = len(_text(c).split())
        out.append(-1.0 if n == 0 else 1.0 if 20 <= n <= 80 else n / 20 if n < 20 else max(-1.0, 1 - (n - 80) / 80))
    return out


RULE_REWARDS: dict[str, Callable[..., list[float]]] = {
    "no_repetition": no_repetition, "ends_cleanly": ends_cleanly, "length": length,
}
