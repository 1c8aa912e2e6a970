"""The benign real-text set: text nobody in this project wrote, to measure (and train against)
false positives on everyday traffic.

Sources, all on a Debian machine: package descriptions (`apt-cache dumpavail` summaries, the
installed packages' long descriptions in /var/lib/dpkg/status), man page paragraphs (rendered
by `man -l`, the way a reader sees them), Python documentation (docstring paragraphs of the
standard library, read with `ast`, so no module is imported), and Vietnamese UI strings from
the `.mo` translation catalogs under /usr/share/locale/vi (read with polib).

`python -m serve.moderation.real_text` writes `real_text.jsonl` beside this module (one
{"text", "source", "lang"} per line, in a fixed order, so a rebuild on the same packages is
the same file); the file is shipped, so training does not depend on what a machine installed.
Which rows are held out of training and calibration is decided by `split_heldout` from the
text's hash.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from cluster.errors import UserError
from cluster.records import jsonl_objects

REAL_TEXT = Path(__file__).with_name("real_text.jsonl")
# Persona and system prompts as deployers and users write them (written for this project; the
# ones in issue 25 among them): {"text", "role"} with role system or user.
PERSONAS = Path(__file__).with_name("personas.jsonl")
SOURCES = ("debian-summary", "debian-description", "man", "python-doc", "vi-po")
MIN_CHARS, MAX_CHARS = 30, 600
_SPACE = re.compile(r"\s+")


def _clean(text: str) -> str | None:
    text = _SPACE.sub(" ", text).strip()
    return text if MIN_CHARS <= len(text) <= MAX_CHARS and sum(ch.isalpha() for ch in text) >= 20 else None


def _hash(text: str, salt: str = "") -> str:
    return hashlib.sha1((salt + text).encode()).hexdigest()


def _sample(texts, n: int, salt: str) -> list[str]:
    """Up to n distinct texts, picked by hash (the same on every rebuild), in hash order."""
    unique = {t for t in (_clean(x) for x in texts) if t}
    return sorted(unique, key=lambda t: _hash(t, salt))[:n]


def debian_summaries(n: int) -> list[str]:
    out = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    summaries = [line[len("Description: "):] for line in out.splitlines() if line.startswith("Description: ")]
    # a summary alone is short: "Real-time strategy game of ancient warfare" (42 chars) passes, "tools" does not
    return _sample(summaries, n, "debian-summary")


def debian_descriptions(n: int, status: Path = Path("/var/lib/dpkg/status")) -> list[str]:
    """Long descriptions (the paragraph under the summary) of the installed packages."""
    texts, body, inside = [], [], False
    for line in status.read_text(encoding="utf-8", errors="replace").splitlines() + [""]:
        if line.startswith("Description:"):
            inside, body = True, []
        elif inside and line.startswith(" "):
            body.append("" if line.strip() == "." else line.strip())
        elif inside:
            inside = False
            texts += [p for p in "\n".join(body).split("\n\n") if p.strip()]
    return _sample(texts, n, "debian-description")


def man_paragraphs(n: int, pages: int = 600, root: Path = Path("/usr/share/man")) -> list[str]:
    """Paragraphs of `pages` man pages (sections 1, 5, 8), rendered without line wrapping; at most
    4 pages of one family (gcloud alone has 16,000 of this machine's 18,000 section-1 pages)."""
    files, family = [], {}
    for page in sorted((p for s in ("man1", "man5", "man8") for p in (root / s).glob("*.gz")), key=lambda p: _hash(p.name)):
        name = re.split(r"[-_.]", page.name)[0]
        family[name] = family.get(name, 0) + 1
        if family[name] <= 4:
            files.append(page)
    env = {**os.environ, "MANWIDTH": "10000", "MAN_KEEP_FORMATTING": "0"}
    paragraphs = []
    for page in files[:pages]:
        done = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, env=env, timeout=30)
        if done.returncode != 0:
            continue
        plain = re.sub(r".\x08", "", done.stdout)  # overstrike bold/underline
        for para in re.split(r"\n\s*\n", plain):
            lines = [ln.strip() for ln in para.splitlines() if ln.strip()]
            if len(lines) == 1 and len(lines[0].split()) >= 8:  # prose, not a heading or an option list
                paragraphs.append(lines[0])
    return _sample(paragraphs, n, "man")


def stdlib_docstrings(skip: tuple[str, ...] = ("test", "tests", "idlelib", "site-packages", "lib2to3")):
    """Every module, class and function docstring of the standard library's source, read with
    `ast` (nothing is imported); folders named in `skip` are left out."""
    import sysconfig

    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if any(part in skip for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def python_docstrings(n: int) -> list[str]:
    """Docstring paragraphs of the standard library (doctest and field-list paragraphs left out)."""
    paragraphs = [p for doc in stdlib_docstrings() for p in doc.split("\n\n")
                  if not p.lstrip().startswith((">>>", ":", "..", "-"))]
    return _sample(paragraphs, n, "python-doc")


def vietnamese_strings(n: int, root: Path = Path("/usr/share/locale/vi/LC_MESSAGES")) -> list[str]:
    import polib

    strings = []
    for mo in sorted(root.glob("*.mo")):
        try:
            catalog = polib.mofile(str(mo))
        except (OSError, ValueError):
            continue
        strings += [e.msgstr for e in catalog if e.msgstr]
    strings = [re.sub(r"%[-+ #0]*\d*(?:\.\d+)?[a-zA-Z]|\{\w*\}|_(?=\w)|&(?=\w)", "", s) for s in strings]
    return _sample(strings, n, "vi-po")


def build(out: Path = REAL_TEXT, per_source: dict[str, int] | None = None) -> dict[str, int]:
    per_source = per_source or {"debian-summary": 2000, "debian-description": 1000, "man": 2500,
                                "python-doc": 2500, "vi-po": 2000}
    readers = {"debian-summary": debian_summaries, "debian-description": debian_descriptions, "man": man_paragraphs,
               "python-doc": python_docstrings, "vi-po": vietnamese_strings}
    rows, seen = [], set()
    for source in SOURCES:
        for text in readers[source](per_source[source]):
            if text not in seen:
                seen.add(text)
                rows.append({"text": text, "source": source, "lang": "vi" if source == "vi-po" else "en"})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return {s: sum(r["source"] == s for r in rows) for s in SOURCES}


def load_real(path: Path = REAL_TEXT, limit: int | None = None) -> list[dict]:
    """The rows of a real-text or persona file (at most `limit`, picked by hash); errors name the line."""
    if not path.is_file():
        raise UserError(f"benign text set {path} does not exist (python -m serve.moderation.real_text builds "
                        f"real_text.jsonl)")
    rows = []
    for n, row in jsonl_objects(path):
        if not isinstance(row.get("text"), str) or not row["text"].strip():
            raise UserError(f"{path}:{n}: not a JSON object with a non-empty `text`")
        row.setdefault("source", path.stem)
        if row.setdefault("role", "user") not in ("system", "developer", "user"):
            raise UserError(f"{path}:{n}: role {row['role']!r} is not system, developer or user")
        rows.append(row)
    if limit is not None and len(rows) > limit:
        keep = set(sorted(range(len(rows)), key=lambda i: _hash(rows[i]["text"], "limit:"))[:limit])
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows


def split_heldout(rows: list[dict], heldout: float) -> tuple[list[dict], list[dict]]:
    """(to train and calibrate on, held out): about `heldout` of every source, by text hash."""
    fit, held = [], []
    for row in rows:
        (held if int(_hash(row["text"], "real:")[:8], 16) / 0xFFFFFFFF < heldout else fit).append(row)
    return fit, held


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="build the benign real-text set from this Debian machine's text")
    ap.add_argument("--out", type=Path, default=REAL_TEXT)
    args = ap.parse_args(argv)
    counts = build(args.out)
    print(f"wrote {sum(counts.values())} texts to {args.out}: " + ", ".join(f"{s} {n}" for s, n in counts.items()))


if __name__ == "__main__":
    sys.exit(main())
