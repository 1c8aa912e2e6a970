"""Batch generation on Ray Data LLM with vLLM, on the session's Ray and the trained run's tiny
model (no mocked engine): a one-off `aero generate` killed mid-run and rerun, with malformed
rows. The data stage's documents through the served endpoint, with moderation on the outputs:
tests/integration/serving/test_clients.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import AERO, REPO, aero

TEMPLATE = "Passage: {{ text[:300] }}\nWrite one question a reader could ask about this passage.\nQuestion:"


def _table(folder):
    import pyarrow.dataset as pads

    return pads.dataset(str(folder), format="parquet").to_table().to_pylist() if folder.exists() else []


@pytest.mark.slow
def test_a_killed_run_resumes_without_duplicates_and_rejects_add_up(post_run, tmp_path):
    tpl = tmp_path / "question.j2"
    tpl.write_text(TEMPLATE)
    rows = [{"text": f"Topic {i}: lists, dicts and sets hold items; item {i} is the one asked about."} for i in range(120)]
    lines = [json.dumps(r) for r in rows] + ['{"text": "broken', json.dumps({"title": "no text field"})]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    args = ["generate", "--model", str(post_run / "sft" / "model"), "--input", str(data), "--template", str(tpl),
            "--run", "gen", "--runs-dir", str(tmp_path), "shard_rows=4", "batch_size=4", "sampling.max_tokens=32",
            "sampling.frequency_penalty=1.0"]
    gen, rej = tmp_path / "gen" / "generate" / "generated", tmp_path / "gen" / "generate" / "rejects"
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen([*AERO, *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (gen.exists() and list(gen.glob("*.parquet"))) and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    before = len(_table(gen))
    assert 0 < before < 120, f"{before} rows were written before the kill"
    assert len(_table(rej)) == 2  # both bad rows, before any inference

    rerun = aero(*args, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:] + rerun.stdout[-2000:]
    assert "120 rows generated, 2 rejected (of 122)" in rerun.stdout, rerun.stdout
    done = _table(gen)
    ids = [r["__id__"] for r in done]
    assert len(ids) == len(set(ids)) == 120  # nothing twice, nothing lost
    reasons = sorted(r["reason"] for r in _table(rej))
    assert len(reasons) == 2 and "rows.jsonl:121: not a JSON line" in reasons[0]
    assert "template field missing: 'text'" in reasons[1]
    assert "done earlier" in rerun.stdout and f"{before + 2} done earlier" in rerun.stdout
