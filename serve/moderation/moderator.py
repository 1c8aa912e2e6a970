"""The moderation decision, without Ray: rules + lexicon/classifier (+ an optional guard model)
give scores per category; the policy turns flagged categories into one action per text.

Used by the Ray Serve deployment (`deployment.py`), the `moderation` stage's evaluation and
`bench/moderation_eval.py`, so all three measure the same thing.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from serve.moderation.classifier import LEARNED, Classifier
from serve.moderation.moderation_config import CATEGORIES, PARENT, Action, ModerationConfig
from serve.moderation.rules import redact, screen_rules, strip_invisible

Direction = Literal["input", "output"]
# The classifier reads words: a text with fewer than 2 letters/digits ("s.", "\n\n", "!!") embeds to noise
# that scored up to 0.68 harmful (a tiny model's fragment "s." was withheld as hate). Rules still apply.
_MIN_ALNUM = 2
_RANK = {"allow": 0, Action.log.value: 1, Action.redact.value: 2, Action.block.value: 3}


@dataclass
class Verdict:
    flagged: bool
    categories: dict[str, bool]
    scores: dict[str, float]
    action: str                      # allow | log | redact | block: the strongest of `actions`
    actions: dict[str, str] = field(default_factory=dict)  # flagged category -> its policy's action
    text: str | None = None          # the redacted text when action == redact
    kinds: dict[str, int] = field(default_factory=dict)  # rule hits by kind (never the matched text)

    def to_dict(self) -> dict:
        return asdict(self)


INSTRUCTION_ROLES = ("system", "developer")


class Moderator:
    def __init__(self, cfg: ModerationConfig, classifier_dir: str, guard_dir: str | None = None,
                 cache_size: int = 4096, classifier: Classifier | None = None):
        self.cfg = cfg
        self.classifier = classifier or Classifier.load(classifier_dir)
        self.threshold = cfg.classifier_threshold or float(self.classifier.meta.get("threshold", 0.5))
        self.guard = None
        if guard_dir:
            from serve.moderation.guard import Guard

            self.guard = Guard(guard_dir, cfg.guard_max_new_tokens)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # text digest -> classifier scores
        self._cache_size = cache_size

    def classify(self, texts: list[str]) -> np.ndarray:
        """[n, LEARNED] classifier scores plus P(harmful) in the last column; repeats (chat
        history resent every turn) come from a small LRU cache."""
        keys = [hashlib.sha256(t.encode()).hexdigest() for t in texts]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        cleaned = {i: strip_invisible(texts[i]) for i in todo}
        for i in [i for i in todo if sum(ch.isalnum() for ch in cleaned[i]) < _MIN_ALNUM]:
            self._cache[keys[i]] = np.zeros(len(LEARNED) + 1, dtype=np.float32)  # no words: nothing to classify
        todo = [i for i in todo if keys[i] not in self._cache]
        if todo:
            cleaned = [cleaned[i] for i in todo]
            scores, harmful = self.classifier.predict(cleaned)
            for j, i in enumerate(todo):
                self._cache[keys[i]] = np.append(scores[j], harmful[j])
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        for k in keys:
            self._cache.move_to_end(k)
        return np.stack([self._cache[k] for k in keys]) if keys else np.zeros((0, len(LEARNED) + 1))

    def screen(self, texts: list[str], direction: Direction, classified: np.ndarray | None = None,
               roles: list[str] | None = None) -> list[Verdict]:
        """A verdict per text. `roles` (chat messages' roles) exempt system/developer messages from
        `prompt_injection`: giving the model instructions is what those messages are for."""
        classified = self.classify(texts) if classified is None else classified
        roles = roles or [None] * len(texts)
        return [self._verdict(t, row, direction, role) for t, row, role in zip(texts, classified, roles)]

    def limit(self, category: str) -> float:
        """The score at which `category` is flagged: the policy's, else the operating point."""
        threshold = self.cfg.rule(category).threshold
        return self.threshold if threshold is None else threshold

    def _verdict(self, text: str, row: np.ndarray, direction: Direction, role: str | None = None) -> Verdict:
        scores = {c: 0.0 for c in CATEGORIES}
        for c, s in zip(LEARNED, row[:-1]):
            scores[c] = float(s)
        found = screen_rules(text)
        for c, s in found.scores.items():
            scores[c] = max(scores[c], s)
        if self.guard is not None:
            for c in self.guard.categories(text, direction):
                scores[c] = 1.0
                if c in PARENT:
                    scores[PARENT[c]] = 1.0
        flagged = {c: scores[c] >= self.limit(c) for c in CATEGORIES}
        if row[-1] >= self.threshold:  # harmful overall: its most likely category
            top = max(LEARNED, key=lambda c: (scores[c], "/" not in c))
            flagged[top] = True
            if top in PARENT:
                flagged[PARENT[top]] = True
        if role in INSTRUCTION_ROLES:
            flagged["prompt_injection"] = False
        actions = {c: getattr(self.cfg.rule(c), direction).value for c, f in flagged.items() if f}
        action = max(actions.values(), key=_RANK.__getitem__, default="allow")
        verdict = Verdict(flagged=bool(actions), categories=flagged, scores={c: round(s, 4) for c, s in scores.items()},
                          action=action, actions=actions,
                          kinds=dict(found.kinds))
        if action == Action.redact.value:
            verdict.text = redact(text, pii=actions.get("pii") == "redact", secrets=actions.get("secrets") == "redact")
        return verdict
