"""The moderation audit log (JSONL, one line per flagged or screened text) and its report.

A line holds when, which direction, model and request, the action, the flagged categories
with their scores, the rule kinds that fired, and the text's length and SHA-256 prefix —
never the text itself, so no PII or secret is copied into the log.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

from cluster.errors import UserError


class AuditLog:
    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, *, text: str, direction: str, verdict: dict, context: dict) -> None:
        if self.path is None:
            return
        row = {"ts": round(time.time(), 3), "direction": direction, "action": verdict["action"],
               "flagged": sorted(c for c, f in verdict["categories"].items() if f),
               "scores": {c: s for c, s in verdict["scores"].items() if verdict["categories"].get(c)},
               "reasons": verdict.get("reasons", []), "margin": verdict.get("margin", {}),
               "kinds": verdict["kinds"], "chars": len(text),
               "sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
               **{k: v for k, v in context.items() if k in ("model", "request_id", "endpoint", "index", "role")}}
        # One write() of one line with O_APPEND: lines from several replicas do not interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (json.dumps(row) + "\n").encode())
        finally:
            os.close(fd)


def parse_window(since: str) -> float:
    """'30m', '24h', '7d' -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", since)
    if not m:
        raise UserError(f"--since {since!r}: write a number and s, m, h or d (e.g. 24h)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


NEAR = 0.1  # a score within this of its threshold is "near" it


def report(path: Path, since_s: float, now: float | None = None) -> dict:
    """Flag rates per direction and category (most frequent first), actions, flags per chat role,
    and, per category, how many texts scored near its threshold (within NEAR) on either side:
    what moving that threshold would change. Over the last `since_s` seconds."""
    if not path.is_file():
        raise UserError(f"no moderation audit log at {path}")
    now = time.time() if now is None else now
    screened: Counter = Counter()
    flagged: dict[str, Counter] = defaultdict(Counter)
    actions: dict[str, Counter] = defaultdict(Counter)
    near: dict[str, Counter] = defaultdict(Counter)
    roles: dict[str, Counter] = defaultdict(Counter)
    bad = 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            ts, direction = float(row["ts"]), row["direction"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if ts < now - since_s:
            continue
        screened[direction] += 1
        actions[direction][row.get("action", "?")] += 1
        for c in row.get("flagged", []):
            flagged[direction][c] += 1
            if row.get("role"):
                roles[row["role"]][c] += 1
        m = row.get("margin") or {}
        if isinstance(m, dict) and m.get("category") and abs(m.get("score", 0) - m.get("threshold", 9)) <= NEAR:
            near[m["category"]]["flagged" if m["score"] >= m["threshold"] else "passed"] += 1
    return {"window_s": since_s, "screened": dict(screened), "unreadable_lines": bad,
            "actions": {d: dict(a) for d, a in actions.items()},
            "flagged": {d: {c: {"count": n, "rate": round(n / screened[d], 4)} for c, n in cats.most_common()}
                        for d, cats in flagged.items()},
            "flagged_by_role": {r: dict(c.most_common()) for r, c in roles.items()},
            "near_threshold": {c: {"passed": n["passed"], "flagged": n["flagged"]}
                               for c, n in sorted(near.items(), key=lambda kv: -sum(kv[1].values()))}}


def report_text(rep: dict) -> str:
    lines = [f"moderation over the last {rep['window_s'] / 3600:g} h"]
    if not rep["screened"]:
        return lines[0] + ": nothing screened"
    for d, n in sorted(rep["screened"].items()):
        acts = ", ".join(f"{a} {k}" for a, k in sorted(rep["actions"].get(d, {}).items()))
        lines.append(f"{d}: {n} screened ({acts})")
        for c, m in rep["flagged"].get(d, {}).items():
            lines.append(f"  {c:24s} {m['count']:6d}  {m['rate']:.2%}")
    for role, cats in rep.get("flagged_by_role", {}).items():
        lines.append(f"flagged in {role} messages: " + ", ".join(f"{c} {n}" for c, n in cats.items()))
    if rep.get("near_threshold"):
        lines.append(f"scores within {NEAR} of the threshold (what moving it would change):")
        for c, n in rep["near_threshold"].items():
            lines.append(f"  {c:24s} {n['passed']:6d} passed just below  {n['flagged']:6d} flagged just above")
    if rep["unreadable_lines"]:
        lines.append(f"({rep['unreadable_lines']} unreadable lines skipped)")
    return "\n".join(lines)


def report_for(source: Path, since: str = "24h", as_json: bool = False) -> str:
    """`aero moderation report`: the report of an audit log file, or of a recipe's deployed
    serve stage (the log its endpoint.json names), as text or JSON."""
    if source.suffix in (".yaml", ".yml"):
        from cluster.config import load_recipe
        from serve.endpoint import read_endpoint

        logged = read_endpoint(load_recipe(source)).get("audit_log")
        if not logged:
            raise UserError(f"{source}: its serve stage runs without moderation, so there is no audit log")
        source = Path(logged)
    rep = report(source.expanduser(), parse_window(since))
    return json.dumps(rep, indent=2) if as_json else report_text(rep)
