"""Rule detectors: PII and secrets, prompt-injection / jailbreak phrasings, invisible and
bidirectional Unicode tricks. Each hit scores 1.0 for its category.

PII and secrets reuse the corpus stage's detector (`data_jobs.pii`), so the data that trains
a model and the text a served model sees are screened by the same patterns and replaced by
the same placeholders. The injection patterns are written here: no maintained package ships
an offline rule set for them (the guard-model and classifier layers catch paraphrases).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from data_jobs.pii import PiiConfig, scrub_pii

PII_KINDS = ("email", "phone", "ip_address", "credit_card", "national_id")

_INJECTION = [
    ("ignore_instructions", re.compile(
        r"\b(?:ignore|disregard|forget|override|bypass)\b(?:\s+(?:all|any|every|of|the|your|my|these|those|previous|prior|"
        r"above|earlier|preceding|initial|original|system|safety|content|developer))*\s+"
        r"(?:instructions?|rules|prompts?|directions|directives|guidelines|polic(?:y|ies)|training|filters?)\b"
        r"|\b(?:forget|ignore|disregard)\s+everything\s+(?:above|before|you\s+(?:were|have\s+been)\s+told)", re.I)),
    ("persona_override", re.compile(
        r"\byou\s+are\s+(?:now\s+)?(?:DAN|an?\s+(?:unfiltered|uncensored|unrestricted|jailbroken|evil)\b)"
        r"|\b(?:act|respond|behave)\s+as\s+(?:an?\s+)?(?:jailbroken|unfiltered|uncensored|unrestricted)\b"
        r"|\b(?:with|have)\s+no\s+(?:restrictions|guidelines|filters|ethics|rules|limits)\b", re.I)),
    ("mode_switch", re.compile(
        r"\b(?:enter|enable|activate|in|now|switch\s+to)\s+(?:the\s+)?(?:developer|god|DAN|jailbreak|unrestricted)\s+mode\b",
        re.I)),
    ("prompt_leak", re.compile(
        r"\b(?:reveal|print|show|repeat|output|leak|tell\s+me)\s+(?:me\s+)?your\s+(?:\w+\s+)?"
        r"(?:system\s+prompt|instructions|prompt|configuration|developer\s+message)"
        r"|\brepeat\s+the\s+(?:text|words|instructions)\s+above\b", re.I)),
    ("fake_delimiter", re.compile(r"</?system>|\[/?INST\]|<\|im_start\|>\s*system|^#{2,}\s*system\b|SYSTEM\s+OVERRIDE",
                                  re.I | re.M)),
    ("ignore_instructions_vi", re.compile(
        r"\b(?:bỏ\s+qua|phớt\s+lờ|quên)\s+(?:đi\s+)?(?:tất\s+cả\s+|mọi\s+)?(?:các\s+|những\s+)?"
        r"(?:hướng\s+dẫn|chỉ\s+dẫn|quy\s+tắc|lệnh)", re.I)),
]
INJECTION_KINDS = tuple(kind for kind, _ in _INJECTION) + ("bidi_or_tag_unicode", "zero_width_unicode")
RULE_KINDS = INJECTION_KINDS  # the kinds a role's policy may ignore (PII and secrets are redacted, not ignored)
# Bidi embeddings/overrides/isolates (Trojan Source), Unicode tag characters (ASCII smuggling).
_BIDI_OR_TAG = re.compile("[\u202a-\u202e\u2066-\u2069\U000e0000-\U000e007f]")
# Zero-width characters; ZWJ/ZWNJ are left out (emoji sequences, Persian and Indic scripts).
_ZERO_WIDTH = re.compile("[\u200b\u2060-\u2064\ufeff]")


@dataclass
class RuleFindings:
    scores: dict[str, float] = field(default_factory=dict)   # category -> 1.0 when a rule hit
    kinds: Counter = field(default_factory=Counter)          # which rules, how many hits (no matched text)


def screen_rules(text: str, ignore: tuple[str, ...] | list[str] = ()) -> RuleFindings:
    """Rule hits in `text`; kinds in `ignore` (a role's policy) are neither counted nor scored."""
    found = RuleFindings()
    _, counts = scrub_pii(text, PiiConfig(keep_private_ips=True))
    for kind, n in counts.items():
        found.kinds[kind] += n
        found.scores["secrets" if kind == "secret" else "pii"] = 1.0
    for kind, pattern in _INJECTION:
        if kind in ignore:
            continue
        n = len(pattern.findall(text))
        if n:
            found.kinds[kind] += n
    if _BIDI_OR_TAG.search(text) and "bidi_or_tag_unicode" not in ignore:
        found.kinds["bidi_or_tag_unicode"] += len(_BIDI_OR_TAG.findall(text))
    zero_width = len(_ZERO_WIDTH.findall(text.lstrip("\ufeff")))
    # one stray ZWSP is common in pasted text; several hide words from filters
    if zero_width >= 3 and "zero_width_unicode" not in ignore:
        found.kinds["zero_width_unicode"] += zero_width
    if any(k in found.kinds for k in INJECTION_KINDS):
        found.scores["prompt_injection"] = 1.0
    return found


def redact(text: str, *, pii: bool, secrets: bool) -> str:
    """PII and/or secrets replaced by typed placeholders (<EMAIL>, <SECRET>, ...)."""
    cfg = PiiConfig(email=pii, phone=pii, ip_address=pii, credit_card=pii, national_id=pii, secret=secrets,
                    keep_private_ips=True)
    return scrub_pii(text, cfg)[0]


def strip_invisible(text: str) -> str:
    """Text with the invisible characters removed, so the classifier sees what a model reads."""
    return _ZERO_WIDTH.sub("", _BIDI_OR_TAG.sub("", text))
