"""`aero feedback export`: stored human feedback -> the datasets post-training reads.

- `preferences.jsonl` (`prompt`, `chosen`, `rejected`): every comparison, and for each prompt
  every thumbs-up answer against every thumbs-down answer to the same conversation;
- `sft.jsonl` (`messages`): thumbs-up answers that nobody rated down.

Each record passes the same checks the `chat_data` stage applies to user files
(`data_jobs.chat_records`), so what is exported is what the reward / DPO stages accept; list
the files under `chat_data.preference_files` / `sft_files` in a recipe. Withheld answers
(moderation) and empty ones are left out and counted.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from cluster.errors import UserError
from cluster.manifest import atomic_write_text
from data_jobs.chat_records import RecordError, preference_record, sft_record
from serve.feedback.store import FeedbackStore


def _usable(answer: dict) -> bool:
    return bool(answer["text"].strip()) and answer.get("finish_reason") != "content_filter"


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def export(url: str, out: Path) -> dict:
    data = FeedbackStore(url).dump()
    replies = {r["id"]: r for r in data["replies"]}
    prefs, sft, skipped = [], [], defaultdict(int)
    seen: set[str] = set()

    def add_pair(prompt: list, chosen: dict, rejected: dict, origin: str) -> None:
        if not (_usable(chosen) and _usable(rejected)):
            skipped["withheld_or_empty"] += 1
            return
        record = {"prompt": prompt, "chosen": _assistant(chosen["text"]), "rejected": _assistant(rejected["text"])}
        key = json.dumps(record, sort_keys=True)
        if key in seen:
            return
        try:
            preference_record(record)
        except RecordError as e:
            skipped[f"invalid: {e}"] += 1
            return
        seen.add(key)
        prefs.append({**record, "origin": origin})

    for c in data["comparisons"]:
        r = replies[c["reply_id"]]
        add_pair(r["messages"], r["answers"][c["chosen"]], r["answers"][c["rejected"]], f"comparison:{r['id']}")

    # conversation -> answer text -> answer, per vote (an answer rated up twice counts once)
    votes: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: {"up": {}, "down": {}})
    prompts: dict[str, list] = {}
    for rating in data["ratings"]:
        r = replies[rating["reply_id"]]
        key = json.dumps(r["messages"], sort_keys=True)
        prompts[key] = r["messages"]
        answer = r["answers"][rating["index"]]
        votes[key]["up" if rating["rating"] > 0 else "down"][answer["text"]] = answer
    for key, v in votes.items():
        for text, up in v["up"].items():
            for down in v["down"].values():
                if text != down["text"]:
                    add_pair(prompts[key], up, down, "ratings")
            if text in v["down"] or not _usable(up):
                continue
            record = {"messages": [*prompts[key], *_assistant(up["text"])]}
            try:
                sft_record(record)
            except RecordError as e:
                skipped[f"invalid: {e}"] += 1
                continue
            record_key = json.dumps(record, sort_keys=True)
            if record_key not in seen:
                seen.add(record_key)
                sft.append(record)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "preferences.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prefs))
    atomic_write_text(out / "sft.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in sft))
    stats = {"replies": len(replies), "ratings": len(data["ratings"]), "comparisons": len(data["comparisons"]),
             "preference_pairs": len(prefs), "sft_examples": len(sft), "skipped": dict(skipped),
             "preferences": str(out / "preferences.jsonl"), "sft": str(out / "sft.jsonl")}
    atomic_write_text(out / "export.json", json.dumps(stats, indent=2) + "\n")
    return stats


def export_from(source: str, out: Path | None = None) -> str:
    """`aero feedback export`: `source` is a recipe (the database its deployed serve stage names
    in endpoint.json), a SQLite file or a SQLAlchemy URL; returns the one-line summary."""
    from serve.feedback.store import sqlite_url

    if source.endswith((".yaml", ".yml")):
        from cluster.config import load_recipe
        from serve.endpoint import read_endpoint

        recipe = load_recipe(Path(source))
        url = read_endpoint(recipe).get("feedback_db")
        if not url:
            raise UserError(f"{source}: its serve stage runs without feedback, so there is no database")
        out = out or recipe.run_dir / "feedback"
    elif "://" in source:
        url = source
    else:
        if not Path(source).expanduser().is_file():
            raise UserError(f"{source}: no such feedback database (give a recipe, a SQLite file or a SQLAlchemy URL)")
        url = sqlite_url(Path(source).expanduser())
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no feedback database at {url.removeprefix('sqlite:///')} (is the serve stage running?)")
    stats = export(url, out or Path("feedback"))
    return (f"feedback: {stats['preference_pairs']} preference pairs -> {stats['preferences']}; "
            f"{stats['sft_examples']} SFT examples -> {stats['sft']} (from {stats['replies']} replies, "
            f"{stats['ratings']} ratings, {stats['comparisons']} comparisons; skipped {stats['skipped'] or 'none'})")
