"""Stage `data` on a real local Ray: bad input is reported and good documents kept, planted
duplicates are removed, PII is scrubbed, and a killed run resumes without redoing parts."""

from __future__ import annotations

import json
import os
import random
import unicodedata
from pathlib import Path

import pandas as pd
from typer.testing import CliRunner

from cluster.cli import app
from cluster.manifest import read_manifest, write_manifest
from tests.conftest import REPO, write_recipe

VIETNAMESE = "Tiếng Việt: người, đường, nghiêng, Hà Nội."


def recipe(tmp_path: Path, run: str, sources: list[str], extra: str = "") -> Path:
    return write_recipe(tmp_path / f"{run}.yaml", run=run, runs_dir=tmp_path / "runs", sources=sources, extra=extra)


def run_data(path: Path, *overrides: str):
    result = CliRunner().invoke(app, ["run", "data", str(path), *overrides])
    assert result.exit_code == 0, result.output
    return result


def rejects_of(stage: Path) -> dict[str, str]:
    rows = []
    for f in sorted((stage / "rejects").glob("*.json")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return {r["doc_id"].split("/")[-1]: r["reason"] for r in rows}


def test_bad_inputs_are_rejected_with_reasons_and_good_documents_kept(ray_cluster, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "vi.txt").write_text(unicodedata.normalize("NFD", VIETNAMESE), encoding="utf-8")
    (root / "good.md").write_text("# Title\n\nSome real prose.\n")
    (root / "page.html").write_text(
        "<html><head><title>t</title><script>var x=1;</script></head><body><nav>Home | About</nav>"
        "<article><h1>Ray Data</h1><p>Ray Data streams blocks of rows through transformations, "
        "so a pipeline can process datasets larger than memory on a whole cluster.</p>"
        "<p>Each operator runs as Ray tasks or actors, and backpressure keeps memory bounded.</p></article>"
        "<footer>Copyright</footer></body></html>"
    )
    (root / "tool.py").write_text("def add(a, b):\n    return a + b\n")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (root / "empty.txt").write_text("  \n\t\n")
    (root / "huge.txt").write_bytes(b"x" * (50 << 20))  # a 50 MB single line
    (root / "data.jsonl").write_text('{"text": "a good record"}\n{"text": broken\n{"body": "no text"}\n{"text": 42}\n')
    (root / "broken.json").write_text('[{"text": "x"}, ')
    (root / "archive.zip").write_bytes(b"PK")
    os.symlink(root / "gone.txt", root / "dangling.txt")
    pd.DataFrame({"text": ["parquet row one", "parquet row two"]}).to_parquet(root / "rows.parquet")

    run_data(recipe(tmp_path, "bad", [str(root)]), "data.max_doc_chars=1000000")
    stage = tmp_path / "runs/bad/data"
    docs = pd.read_parquet(stage / "documents")
    texts = set(docs["text"])
    assert {"# Title\n\nSome real prose.", VIETNAMESE, "a good record", "parquet row one", "parquet row two",
            "def add(a, b):\n    return a + b"} <= texts
    html = docs[docs["kind"] == "html"]["text"].item()
    assert "backpressure keeps memory bounded" in html and "var x" not in html and "Home | About" not in html
    assert docs[docs["kind"] == "code"]["language"].item() == "python"
    reasons = rejects_of(stage)
    assert reasons["image.txt"] == "ingest: binary file (NUL bytes)"
    assert reasons["latin1.txt"] == "ingest: invalid UTF-8 at byte 3"
    assert reasons["empty.txt"] == "normalize: empty after normalization"
    assert reasons["huge.txt"].startswith("ingest: file of 52428800 bytes is over the document limit")
    assert reasons["data.jsonl:2"].startswith("ingest: malformed JSON line")
    assert reasons["data.jsonl:3"] == reasons["data.jsonl:4"] == "ingest: record has no string field 'text'"
    assert reasons["broken.json"].startswith("ingest: malformed JSON")
    assert reasons["archive.zip"] == "ingest: unsupported file type .zip"
    assert reasons["dangling.txt"].startswith("ingest: unreadable")
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["documents_out"] == len(docs) == 7
    assert stats["documents_in"] == stats["documents_out"] + stats["rejected_total"]
    assert stats["removed"]["ingest"] == 9 and stats["removed"]["normalize"] == 1
    assert (stage / "funnel.png").stat().st_size > 1000


def _words(rng: random.Random, n: int) -> list[str]:
    vocab = [f"{a}{b}" for a in ("ka", "lo", "mi", "ne", "po", "ru", "si", "ta") for b in "aeioudfgklmnprst"]
    return [rng.choice(vocab) for _ in range(n)]


def test_planted_exact_and_near_duplicates_are_removed_and_distinct_documents_survive(ray_cluster, tmp_path):
    rng = random.Random(7)
    root = tmp_path / "dups"
    root.mkdir()
    originals = [_words(rng, 400) for _ in range(6)]
    for i, words in enumerate(originals):
        (root / f"doc{i}.txt").write_text(" ".join(words))
    (root / "exact_of_0.txt").write_text(" ".join(originals[0]))
    edited = [w if rng.random() > 0.03 else "edited" for w in originals[1]]  # ~3% of words edited
    (root / "near_of_1.txt").write_text(" ".join(edited))
    (root / "zz_near_of_2.txt").write_text(" ".join(originals[2][:-8]))  # tail trimmed
    run_data(recipe(tmp_path, "dups", [str(root)]))
    stage = tmp_path / "runs/dups/data"
    kept = {Path(s).name for s in pd.read_parquet(stage / "documents")["source"]}
    assert kept == {f"doc{i}.txt" for i in range(6)}
    dups = pd.read_parquet(stage / "dedup/duplicates.parquet")
    by_doc = {Path(d).name: (Path(k).name, kind) for d, k, kind in zip(dups["doc_id"], dups["kept"], dups["dedup"])}
    assert by_doc == {
        "exact_of_0.txt": ("doc0.txt", "exact"),
        "near_of_1.txt": ("doc1.txt", "near"),
        "zz_near_of_2.txt": ("doc2.txt", "near"),
    }
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["removed"]["dedup_exact"] == 1 and stats["removed"]["dedup_near"] == 2


def test_pii_is_scrubbed_in_kept_documents(ray_cluster, tmp_path):
    root = tmp_path / "pii"
    root.mkdir()
    (root / "contact.txt").write_text("Mail ops@example.org, card 4111 1111 1111 1111, host 198.51.100.23.")
    run_data(recipe(tmp_path, "pii", [str(root)]))
    stage = tmp_path / "runs/pii/data"
    text = pd.read_parquet(stage / "documents")["text"].item()
    assert text == "Mail <EMAIL>, card <CREDIT_CARD>, host <IP_ADDRESS>."
    assert json.loads((stage / "stats.json").read_text())["pii_replaced"] == {"email": 1, "credit_card": 1, "ip_address": 1}


def test_default_sources_keep_code_as_code_and_prose_by_language(ray_cluster, tmp_path):
    run_data(REPO / "configs/tiny-cpu.yaml", f"runs_dir={tmp_path}")
    stats = json.loads((tmp_path / "tiny-cpu/data/stats.json").read_text())
    assert stats["documents_by_kind"]["code"] >= 10  # stdlib modules are not dropped as bad prose
    assert stats["documents_by_language"]["vi"] == 1 and stats["documents_by_language"]["en"] > 40
    assert stats["documents_by_split"]["val"] >= 1
    steps = [s["step"] for s in stats["funnel"]]
    assert steps[0] == "input" and steps[-1] == "dedup_near"
    assert stats["funnel"][-1]["documents_left"] == stats["documents_out"]


def test_killed_run_resumes_without_redoing_finished_parts(ray_cluster, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    rng = random.Random(3)
    for i in range(6):
        (root / f"f{i}.txt").write_text(" ".join(_words(rng, 300)))
    path = recipe(tmp_path, "resume", [str(root)], "  part_bytes: 2500\n")
    run_data(path)
    stage = tmp_path / "runs/resume/data"
    parts = sorted((stage / "parts").iterdir())
    assert len(parts) == 3
    before = {p.name: [f.stat().st_mtime_ns for f in sorted(p.iterdir())] for p in parts}
    # Simulate a kill during the last part: its marker and the outputs are gone, the manifest says running.
    (stage / "parts_done" / parts[-1].name).unlink()
    manifest = read_manifest(stage)
    manifest.status = "running"
    write_manifest(stage, manifest)
    result = run_data(path)
    assert result.output.count("already cleaned; kept") == 2
    after = {p.name: [f.stat().st_mtime_ns for f in sorted(p.iterdir())] for p in sorted((stage / "parts").iterdir())}
    assert after[parts[0].name] == before[parts[0].name] and after[parts[1].name] == before[parts[1].name]
    assert after[parts[2].name] != before[parts[2].name]
    assert read_manifest(stage).status == "finished"
    assert len(pd.read_parquet(stage / "documents")) == 6


def test_missing_source_is_a_clear_error(ray_cluster, tmp_path):
    result = CliRunner().invoke(app, ["run", "data", str(recipe(tmp_path, "missing", [str(tmp_path / "nope")]))])
    assert result.exit_code == 2
    assert f"source '{tmp_path / 'nope'}': no such file" in result.output


def test_sources_can_be_storage_uris(ray_cluster, tmp_path):
    """A `file://` URI goes through pyarrow's filesystem layer, as s3:// or gs:// would."""
    root = tmp_path / "bucket" / "prefix"
    root.mkdir(parents=True)
    (root / "a.txt").write_text("Read through pyarrow's filesystem.")
    (root / "nested").mkdir()
    (root / "nested" / "b.jsonl").write_text('{"text": "A record under a nested prefix."}\n')
    run_data(recipe(tmp_path, "uri", [f"file://{tmp_path / 'bucket'}"]))
    docs = pd.read_parquet(tmp_path / "runs/uri/data/documents")
    assert sorted(docs["text"]) == ["A record under a nested prefix.", "Read through pyarrow's filesystem."]
    assert all(s.startswith("file://") for s in docs["source"])
    sources = json.loads((tmp_path / "runs/uri/data/sources.json").read_text())
    assert len(sources[0]["files"]) == 2

