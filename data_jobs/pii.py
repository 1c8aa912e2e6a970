"""PII and secret scrubbing: matches are replaced by typed placeholders and counted.

Written here with regular expressions because the maintained scrubbers (Presidio, scrubadub)
need spaCy models from a hub or do not detect secrets; these patterns follow BigCode's
PII pipeline (e-mail, IPs) and the secret formats that gitleaks documents.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from cluster.config import StrictModel

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip_address": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
    "secret": "<SECRET>",
    "national_id": "<NATIONAL_ID>",
}


class PiiConfig(StrictModel):
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip_address: bool = True
    credit_card: bool = True
    secret: bool = True
    national_id: bool = True
    keep_private_ips: bool = False


_SECRET_HINTS = ("-----BEGIN", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "sk-", "AIza", "hf_", "eyJ")
_ASSIGNED_HINTS = ("key", "token", "secret", "pass", "KEY", "TOKEN", "SECRET", "PASS", "Key", "Token", "Secret", "Pass")
_DIGIT_RUN = re.compile(r"\d[\d .()+-]{5,}\d|\d+\.\d+\.\d+\.\d+")
_SECRET_PATTERNS = [
    re.compile(r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY-----[\s\S]+?-----END (?:RSA |EC |DSA |OPENSSH |PGP )?PRIVATE KEY-----"),
    re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),                      # AWS access key id
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),                     # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{50,}\b"),
    re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}\b"),                   # Slack
    re.compile(r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{32,}\b"),           # OpenAI / Anthropic style
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),                          # Google API key
    re.compile(r"\bhf_[A-Za-z0-9]{30,}\b"),                            # Hugging Face
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b"),  # JWT
]
# key = "value" assignments whose name says secret and whose value looks random.
_ASSIGNED_SECRET = re.compile(
    r"""(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd|client[_-]?secret)\b\s*[:=]\s*["'])([^"'\s]{12,})(["'])"""
)
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\d|\.\d)")
_IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![:\w])")
# US SSN (area not 000/666/9xx, group not 00, serial not 0000; dashes required) and UK NINO.
_NATIONAL_ID = re.compile(
    r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])"
    r"|\b(?!BG|GB|NK|KN|TN|NT|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"
)
_CARD = re.compile(r"(?<!\d)(?:\d[ -]?){12,18}\d(?!\d)")
_PHONE = re.compile(
    r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}(?!\w)(?![ .-]\d)"
)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _looks_random(value: str) -> bool:
    return len(set(value)) >= 8 and any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def scrub_pii(text: str, cfg: PiiConfig) -> tuple[str, Counter]:
    """Return the scrubbed text and how many of each kind were replaced."""
    counts: Counter = Counter()
    if not cfg.enabled:
        return text, counts

    def sub(pattern: re.Pattern, kind: str, text: str, accept=None) -> str:
        def repl(m: re.Match) -> str:
            if accept is not None and not accept(m):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    # Each pattern runs only when a cheap substring check says it could match.
    if cfg.secret and any(h in text for h in _SECRET_HINTS):
        for pattern in _SECRET_PATTERNS:
            text = sub(pattern, "secret", text)
    if cfg.secret and any(h in text for h in _ASSIGNED_HINTS):

        def assigned(m: re.Match) -> str:
            if not _looks_random(m.group(2)):
                return m.group(0)
            counts["secret"] += 1
            return m.group(1) + PLACEHOLDERS["secret"] + m.group(3)

        text = _ASSIGNED_SECRET.sub(assigned, text)
    if cfg.email and "@" in text:
        text = sub(_EMAIL, "email", text)
    if cfg.national_id and any(c.isdigit() for c in text):
        text = sub(_NATIONAL_ID, "national_id", text)
    digits = _DIGIT_RUN.search(text) is not None
    if cfg.credit_card and digits:
        def is_card(m: re.Match) -> bool:
            digits = re.sub(r"\D", "", m.group(0))
            return 13 <= len(digits) <= 19 and luhn_valid(digits)

        text = sub(_CARD, "credit_card", text, is_card)
    if cfg.ip_address:
        def is_ip(m: re.Match) -> bool:
            try:
                ip = ipaddress.ip_address(m.group(0))
            except ValueError:
                return False
            return not (cfg.keep_private_ips and (ip.is_private or ip.is_loopback))

        if digits:
            text = sub(_IPV4, "ip_address", text, is_ip)
        if text.count(":") >= 7:
            text = sub(_IPV6, "ip_address", text, is_ip)
    if cfg.phone and digits:
        text = sub(_PHONE, "phone", text, lambda m: sum(c.isdigit() for c in m.group(0)) >= 9)
    return text, counts
