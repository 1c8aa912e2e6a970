"""Benchmark of stage `data` against datatrove, side by side on the same input and cores.

    .venv/bin/python bench/data_bench.py [--mb 100] [--workers 2]

1. Builds a prose corpus of --mb MB from the standard library's documentation (sentences of
   pydoc topics recombined into documents), with planted near-duplicates (a few percent of
   words replaced; exact Jaccard >= 0.8 on 5-word shingles, checked) and exact copies.
2. Runs our `data` stage (Ray Data, --workers CPUs, Ray start-up included) on all of it,
   and on a quarter of it to show the driver's peak memory does not grow with the corpus.
3. Runs datatrove 0.10.1 (bench/datatrove_peer.py, in its own venv bench/.venv-datatrove
   with xxhash<4, which its MinHash needs) doing the same work: Gopher quality and
   repetition filters, C4 filter, and its 4-step MinHash dedup, with --workers processes.
4. Prints MB/s of each, the ratio, near-dup recall and precision of ours against exact
   Jaccard on the planted pairs, and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_VENV = REPO / "bench" / ".venv-datatrove"
SHINGLE = 5


def _prose_texts():
    """The stdlib's pydoc topics and its modules' docstrings: the default corpus's prose."""
    from pydoc_data.topics import topics

    from serve.moderation.real_text import stdlib_docstrings

    yield from topics.values()
    yield from stdlib_docstrings(skip=("test", "idlelib"))


def sentences() -> list[str]:
    """Plain English sentences: ending in punctuation, mostly alphabetic words (datatrove's
    Gopher filter counts punctuation as words, so code-heavy prose would be dropped there)."""
    pool = set()
    for text in _prose_texts():
        for para in re.split(r"\n\s*\n", text):
            if para.startswith((" ", "\t")) or ">>>" in para:
                continue  # code examples
            for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                words = s.split()
                if not (6 <= len(words) <= 40 and s[-1] in ".!?") or re.search(r"[{}#*`|<>\[\]]|\.\.\.|javascript|lorem", s, re.I):
                    continue
                alpha = sum(w.strip(".,;:!?\"'").isalpha() for w in words) / len(words)
                if alpha >= 0.95 and sum(c in ",;:()" for c in s) <= 1:
                    pool.add(s)
    return sorted(pool)


def shingles(text: str) -> set[tuple[str, ...]]:
    w = text.lower().split()
    return {tuple(w[i : i + SHINGLE]) for i in range(max(len(w) - SHINGLE + 1, 1))}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def build_corpus(out: Path, megabytes: int, seed: int = 0) -> dict:
    """JSON-lines files of documents; returns the planted pairs (by doc_id = path:line)."""
    marker = out / "planted.json"
    if marker.exists() and json.loads(marker.read_text())["mb"] == megabytes:
        return json.loads(marker.read_text())
    rng = random.Random(seed)
    pool = sentences()
    vocab = sorted({w for s in pool for w in s.split()})
    corpus = out / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for f in corpus.glob("*.jsonl"):
        f.unlink()
    target, written, file_no, planted = megabytes * 1_000_000, 0, 0, {"near": [], "exact": []}
    recent: list[tuple[str, str]] = []
    while written < target:
        path = corpus / f"part-{file_no:04d}.jsonl"
        lines = []
        size = 0
        while size < 1_000_000 and written + size < target:
            kind = rng.random()
            if recent and kind < 0.03:  # near copy of a recent document
                orig_id, orig = rng.choice(recent)
                for rate in (0.02, 0.01, 0.005):
                    words = [rng.choice(vocab) if rng.random() < rate else w for w in orig.split(" ")]
                    text = " ".join(words)
                    if text != orig and jaccard(orig, text) >= 0.8:
                        break
                else:
                    continue
                planted["near"].append((orig_id, f"{path}:{len(lines) + 1}", round(jaccard(orig, text), 4)))
            elif recent and kind < 0.04:
                orig_id, text = rng.choice(recent)
                planted["exact"].append((orig_id, f"{path}:{len(lines) + 1}", 1.0))
            else:
                n = rng.randint(40, 120)
                picked = rng.sample(pool, n)
                paras, i = [], 0
                while i < n:
                    k = rng.randint(3, 6)
                    paras.append(" ".join(picked[i : i + k]))
                    i += k
                text = "\n\n".join(paras)
                recent.append((f"{path}:{len(lines) + 1}", text))
                recent = recent[-200:]
            line = json.dumps({"text": text}, ensure_ascii=False)
            lines.append(line)
            size += len(line) + 1
        path.write_text("\n".join(lines) + "\n")
        written += size
        file_no += 1
    planted["mb"] = megabytes
    planted["bytes"] = sum(f.stat().st_size for f in corpus.glob("*.jsonl"))
    marker.write_text(json.dumps(planted))
    return planted


RECIPE = """run: {run}
runs_dir: {runs}
ray: {{num_cpus: {workers}, dashboard: false}}
stages: [data]
data:
  sources: {sources}
  part_bytes: 400000000
  blocks_per_part: {blocks}
  shuffle_partitions: {workers}
  quality:
    language: {{languages: [en]}}
  dedup: {{num_perm: 112, bands: 16, rows: 7, threshold: 0.7}}
"""


def run_ours(out: Path, run: str, sources: list[str], workers: int) -> dict:
    """Our stage in a fresh driver process; returns its wall time and the driver's peak RSS."""
    import shutil

    shutil.rmtree(out / "runs" / run, ignore_errors=True)
    recipe = out / f"{run}.yaml"
    blocks = max(workers * 4, len(sources) if len(sources) > 1 else 8)
    recipe.write_text(RECIPE.format(run=run, runs=out / "runs", workers=workers, sources=json.dumps(sources), blocks=blocks))
    code = (
        "import json, resource, sys, time\n"
        "from cluster.config import load_recipe\nfrom cluster.runner import run_stage\n"
        f"t = time.perf_counter(); m = run_stage(load_recipe({str(recipe)!r}), 'data')\n"
        "print(json.dumps({'wall_s': time.perf_counter() - t, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'documents_out': m.metrics['documents_out']}))\n"
    )
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"our stage failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_peer(out: Path, workers: int) -> dict | None:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"peer skipped: no {PEER_VENV} (see bench/datatrove_peer.py for its install line)", file=sys.stderr)
        return None
    result = subprocess.run(
        [str(python), str(REPO / "bench" / "datatrove_peer.py"), str(out / "corpus"), str(out / "datatrove"), str(workers)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        sys.exit(f"datatrove failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def dedup_quality(out: Path, planted: dict) -> dict:
    import pandas as pd

    stage = out / "runs" / "full" / "data"
    dups = pd.read_parquet(stage / "dedup" / "duplicates.parquet")
    root = dict(zip(dups["doc_id"], dups["kept"]))
    kept_ids = set(pd.read_parquet(stage / "documents", columns=["doc_id"])["doc_id"])
    rejected = set()
    for f in (stage / "rejects").glob("*.json"):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if not r["step"].startswith("dedup"):
                rejected.add(r["doc_id"])
    pairs = [p for p in planted["near"] if p[0] not in rejected and p[1] not in rejected]
    found = sum(1 for a, b, _ in pairs if root.get(a, a) == root.get(b, b))
    texts = {}
    near = dups[dups["dedup"] == "near"]
    wanted = set(near["doc_id"]) | set(near["kept"])
    for f in sorted((out / "corpus").glob("*.jsonl")):
        for i, line in enumerate(f.read_text().splitlines(), start=1):
            key = f"{f}:{i}"
            if key in wanted:
                texts[key] = json.loads(line)["text"]
    true_pos = sum(1 for d, k in zip(near["doc_id"], near["kept"]) if jaccard(texts[d], texts[k]) >= 0.8)
    return {
        "planted_pairs": len(planted["near"]),
        "planted_pairs_surviving_filters": len(pairs),
        "recall": found / len(pairs) if pairs else None,
        "precision": true_pos / len(near) if len(near) else None,
        "near_removed": int(len(near)),
        "exact_removed": int((dups["dedup"] == "exact").sum()),
        "exact_planted": len(planted["exact"]),
        "documents_kept": len(kept_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "data")
    parser.add_argument("--skip-peer", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    planted = build_corpus(args.out, args.mb)
    mb = planted["bytes"] / 1e6
    print(f"corpus: {mb:.1f} MB, {len(planted['near'])} planted near pairs, built in {time.perf_counter() - t:.0f}s", flush=True)

    files = sorted(str(p) for p in (args.out / "corpus").glob("*.jsonl"))
    quarter_files = files[: max(1, len(files) // 4)]
    quarter = run_ours(args.out, "quarter", quarter_files, args.workers)
    print(f"ours (quarter, {len(quarter_files)} files): {quarter['wall_s']:.1f}s, driver peak {quarter['peak_rss_mb']:.0f} MB", flush=True)
    ours = run_ours(args.out, "full", [str(args.out / "corpus")], args.workers)
    ours_mb_s = mb / ours["wall_s"]
    print(f"ours (full): {ours['wall_s']:.1f}s = {ours_mb_s:.2f} MB/s, driver peak {ours['peak_rss_mb']:.0f} MB", flush=True)
    quality = dedup_quality(args.out, planted)
    print(f"near-dup recall {quality['recall']:.3f}, precision {quality['precision']:.3f} ({quality})", flush=True)

    peer = None if args.skip_peer else run_peer(args.out, args.workers)
    peer_mb_s = mb / peer["wall_s"] if peer else None
    if peer:
        print(f"datatrove: {peer['wall_s']:.1f}s = {peer_mb_s:.2f} MB/s ({peer})", flush=True)
    figures = {
        "bench": "data",
        "corpus_mb": round(mb, 1),
        "workers": args.workers,
        "ours_mb_s": round(ours_mb_s, 3),
        "peer_mb_s": round(peer_mb_s, 3) if peer_mb_s else None,
        "ratio": round(ours_mb_s / peer_mb_s, 2) if peer_mb_s else None,
        "recall": round(quality["recall"], 4),
        "precision": round(quality["precision"], 4),
        "driver_peak_mb_quarter": round(quarter["peak_rss_mb"]),
        "driver_peak_mb_full": round(ours["peak_rss_mb"]),
        "driver_peak_growth": round(ours["peak_rss_mb"] / quarter["peak_rss_mb"], 3),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
