"""Reading the JSON-lines files that stages write and read (metrics logs, chat records), and
drawing their curves: one place, so every stage reads and plots them the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from cluster.errors import UserError


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The records of a JSONL file that the project wrote itself (blank lines skipped; a file
    that does not exist yet reads as empty). Files a user may have written go through
    `jsonl_objects`, which names a bad line."""
    rows: list[dict] = []
    if not Path(path).exists():
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file a user may have written;
    a line that is not a JSON object stops with an error naming the file and the line."""
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UserError(f"{path}:{n}: not a JSON line ({exc})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: not a JSON object")
        yield n, row


def read_history(path: Path) -> list[dict]:
    """Per-step metrics in step order; a step logged again after a restart keeps its last entry."""
    by_step = {entry["step"]: entry for entry in read_jsonl(path)}
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(series: dict[str, list[tuple[float, float]]], path: Path, *, ylabel: str,
                title: str | None = None, xlabel: str = "step") -> Path:
    """A PNG of one or more (x, y) curves, e.g. train and validation loss per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-" if len(points) < 60 else "-", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if 1 < len(series) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
