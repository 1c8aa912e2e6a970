"""What a reader sees in generated text, measured: degeneration (distinct-n, repeated 4-grams,
answers that end in a loop) and similarity to a reference answer by an independent judge
(ROUGE-L from `rouge-score`, chrF from `sacrebleu`: maintained packages, and nothing the
policies were trained against). Used by the eval stage and to keep looping answers out of
DPO's chosen side."""

from __future__ import annotations

from typing import Any


def _words(text: str) -> list[str]:
    return text.split()


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of all texts (1.0: nothing repeats; 0 when there are none)."""
    grams = [tuple(w[i:i + n]) for w in map(_words, texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """The share of a text's n-grams that repeat an earlier one."""
    w = _words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def ends_in_loop(text: str, max_period: int = 12, repeats: int = 3) -> bool:
    """Whether the text ends with the same run of words (up to `max_period` long) at least
    `repeats` times in a row, as a model stuck in a loop writes until its token limit."""
    w = _words(text)
    for p in range(1, max_period + 1):
        if len(w) < p * repeats:
            break
        tail = w[-p:]
        if all(w[-(k + 1) * p:len(w) - k * p] == tail for k in range(1, repeats)):
            return True
    return False


def degenerate(text: str, max_repeated_share: float = 0.5) -> bool:
    """A looping or mostly repeated answer: never the preferred side of a preference pair."""
    return ends_in_loop(text) or repeated_ngram_share(text) > max_repeated_share


def degeneration(texts: list[str]) -> dict[str, float]:
    n = max(len(texts), 1)
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "repeated_4gram_share": sum(repeated_ngram_share(t) for t in texts) / n,
            "loop_share": sum(ends_in_loop(t) for t in texts) / n}


def judge(answers: list[str], references: list[str]) -> dict[str, Any]:
    """Similarity of each answer to its held-out reference: mean ROUGE-L F1 and corpus chrF (0-100)."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, ans)["rougeL"].fmeasure for ans, ref in zip(answers, references)]
    chrf = CHRF().corpus_score(answers, [references]).score if answers else 0.0
    return {"rouge_l": sum(rouge) / max(len(rouge), 1), "chrf": chrf}
