"""The moderation decision, without Ray: rules + lexicon/classifier (+ an optional guard model)
give scores per category; the policy turns flagged categories into one action per text.

Used by the Ray Serve deployment (`deployment.py`), the `moderation` stage's evaluation and
`bench/moderation_bench.py`, so all three measure the same thing.
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
# that can score as harmful (a tiny model's fragment "s." was withheld as hate). Rules still apply.
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
    # why each flagged category was flagged: {category, score, threshold, by: score | harmful | rules | guard};
    # `harmful` = P(not benign) reached the operating point and this was the likeliest category
    reasons: list[dict] = field(default_factory=list)
    margin: dict = field(default_factory=dict)  # the screened category closest to its threshold: {category, score, threshold}

    def to_dict(self) -> dict:
        return asdict(self)


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
        found = {k: self._cache[k] for k in keys if k in self._cache}
        todo = [i for i, k in enumerate(keys) if k not in found]
        cleaned = {i: strip_invisible(texts[i]) for i in todo}
        for i in [i for i in todo if sum(ch.isalnum() for ch in cleaned[i]) < _MIN_ALNUM]:
            found[keys[i]] = np.zeros(len(LEARNED) + 1, dtype=np.float32)  # no words: nothing to classify
        todo = [i for i in todo if keys[i] not in found]
        if todo:
            scores, harmful = self.classifier.predict([cleaned[i] for i in todo])
            for j, i in enumerate(todo):
                found[keys[i]] = np.append(scores[j], harmful[j])
        for k in keys:  # a batch larger than the cache is answered whole; the cache keeps its last texts
            self._cache[k] = found[k]
            self._cache.move_to_end(k)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, len(LEARNED) + 1))

    def screen(self, texts: list[str], direction: Direction, classified: np.ndarray | None = None,
               roles: list[str] | None = None) -> list[Verdict]:
        """A verdict per text. `roles` (chat messages' roles) pick each text's role policy (which
        categories are screened, at which thresholds, ignoring which rules); none: every category."""
        classified = self.classify(texts) if classified is None else classified
        roles = roles or [None] * len(texts)
        return [self._verdict(t, row, direction, role) for t, row, role in zip(texts, classified, roles)]

    def limit(self, category: str, role: str | None = None) -> float:
        """The score at which `category` is flagged: the role's, else the category policy's, else
        the operating point."""
        threshold = self.cfg.role(role).thresholds.get(category, self.cfg.rule(category).threshold)
        return self.threshold if threshold is None else threshold

    def _verdict(self, text: str, row: np.ndarray, direction: Direction, role: str | None = None) -> Verdict:
        policy = self.cfg.role(role)
        screened = set(CATEGORIES if policy.screen is None else policy.screen)
        scores = {c: 0.0 for c in CATEGORIES}
        by = {c: "score" for c in CATEGORIES}
        for c, s in zip(LEARNED, row[:-1]):
            scores[c] = float(s)
        found = screen_rules(text, ignore=policy.ignore_rules)
        for c, s in found.scores.items():
            scores[c], by[c] = max(scores[c], s), "rules"
        if self.guard is not None:
            for c in self.guard.categories(text, direction):
                for hit in {c, PARENT.get(c, c)}:
                    scores[hit], by[hit] = 1.0, "guard"
        limits = {c: self.limit(c, role) for c in CATEGORIES}
        flagged = {c: c in screened and scores[c] >= limits[c] for c in CATEGORIES}
        reasons = [{"category": c, "score": round(scores[c], 4), "threshold": limits[c], "by": by[c]}
                   for c in CATEGORIES if flagged[c]]
        # Harmful overall: its likeliest category, unless a layer of the policy set that category's own threshold.
        own = {c for c in CATEGORIES if c in policy.thresholds or self.cfg.rule(c).threshold is not None}
        candidates = [c for c in LEARNED if c in screened]
        top = max(candidates, key=lambda c: (scores[c], "/" not in c), default=None)
        if row[-1] >= self.threshold and top is not None:
            for c in {top, PARENT.get(top, top)} - own:
                if not flagged[c]:
                    flagged[c] = True
                    reasons.append({"category": c, "score": round(float(row[-1]), 4), "threshold": self.threshold,
                                    "by": "harmful"})
        actions = {c: getattr(self.cfg.rule(c), direction).value for c, f in flagged.items() if f}
        action = max(actions.values(), key=_RANK.__getitem__, default="allow")
        near = max(screened & set(LEARNED), key=lambda c: scores[c] - limits[c], default=None)
        verdict = Verdict(flagged=bool(actions), categories=flagged, scores={c: round(s, 4) for c, s in scores.items()},
                          action=action, actions=actions, kinds=dict(found.kinds), reasons=reasons,
                          margin={"category": near, "score": round(scores[near], 4), "threshold": limits[near]}
                          if near else {})
        if action == Action.redact.value:
            verdict.text = redact(text, pii=actions.get("pii") == "redact", secrets=actions.get("secrets") == "redact")
        return verdict
