"""Stage `data` (first slice): normalized documents and a reason for every rejected record."""

from __future__ import annotations

import json
import unicodedata

import pandas as pd
from typer.testing import CliRunner

from cluster.cli import app
from data_jobs.documents import normalize_text
from tests.conftest import write_recipe

VIETNAMESE = "Tiếng Việt: người, đường, nghiêng, Hà Nội."


def test_normalize_keeps_vietnamese_composed_and_cleans_layout():
    decomposed = unicodedata.normalize("NFD", VIETNAMESE)
    assert decomposed != VIETNAMESE
    assert normalize_text(decomposed) == VIETNAMESE
    assert normalize_text("a\x00b\x1bc\r\nd  \n\n\n\ne\x85") == "abc\nd\n\ne"


def _read_jsonl_folder(folder):
    rows = []
    for f in sorted(folder.glob("*.json")):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def test_bad_inputs_are_rejected_with_reasons_and_good_documents_kept(ray_cluster, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    (root / "vi.txt").write_text(unicodedata.normalize("NFD", VIETNAMESE), encoding="utf-8")
    (root / "good.md").write_text("# Title\n\nSome real prose.\n")
    (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (root / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (root / "empty.txt").write_text("  \n\t\n")
    (root / "data.jsonl").write_text(
        '{"text": "a good record"}\n{"text": broken\n{"body": "no text field"}\n{"text": 42}\n'
    )
    (root / "archive.zip").write_bytes(b"PK")
    recipe = write_recipe(tmp_path / "r.yaml", run="bad", runs_dir=tmp_path / "runs", sources=[str(root)])

    result = CliRunner().invoke(app, ["run", "data", str(recipe)])
    assert result.exit_code == 0, result.output
    stage = tmp_path / "runs/bad/data"
    docs = pd.read_parquet(stage / "documents")
    assert sorted(docs["text"]) == sorted(["# Title\n\nSome real prose.", VIETNAMESE, "a good record"])
    assert set(docs["kind"]) == {"prose"}
    reasons = {r["source"].split("/")[-1]: r["reason"] for r in _read_jsonl_folder(stage / "rejects")}
    assert reasons == {
        "image.txt": "binary file (NUL bytes)",
        "latin1.txt": "invalid UTF-8 at byte 3",
        "empty.txt": "empty after normalization",
        "data.jsonl:2": reasons["data.jsonl:2"],
        "data.jsonl:3": "record has no string field 'text'",
        "data.jsonl:4": "record has no string field 'text'",
        "archive.zip": "unsupported file type .zip",
    }
    assert reasons["data.jsonl:2"].startswith("malformed JSON line")
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["documents_out"] == 3 and stats["rejected"] == 7 and stats["files_in"] == 7


def test_code_is_kept_as_code_with_its_language(ray_cluster, tmp_path, small_corpus):
    recipe = write_recipe(tmp_path / "r.yaml", run="code", runs_dir=tmp_path / "runs", sources=[str(small_corpus / "*.py")])
    result = CliRunner().invoke(app, ["run", "data", str(recipe)])
    assert result.exit_code == 0, result.output
    docs = pd.read_parquet(tmp_path / "runs/code/data/documents")
    assert list(docs["kind"]) == ["code"] and list(docs["language"]) == ["python"]
    assert docs["text"][0] == "def add(a, b):\n    return a + b"


def test_missing_source_is_a_clear_error(ray_cluster, tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", run="missing", runs_dir=tmp_path / "runs", sources=[str(tmp_path / "nope")])
    result = CliRunner().invoke(app, ["run", "data", str(recipe)])
    assert result.exit_code == 2
    assert f"source '{tmp_path / 'nope'}': no such file" in result.output
