"""`aero pipeline` end to end as a user runs it: the real CLI in its own process, killed during
pretraining, rerun to completion and serving, then restored from its artifact store on a
"fresh node"."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import openai
import psutil
import pytest

from cluster.manifest import hash_path, read_manifest
from tests.conftest import AERO, LENIENT_QUALITY, REPO, aero, free_port

STEPS, EVERY = 16, 4
KEYS = {"AERO_API_KEYS": "e2e-key"}


def _write_recipe(runs: Path, port: int) -> Path:
    path = runs / "e2e.yaml"
    path.write_text(
        f"run: e2e\nruns_dir: {runs}\nstages: [data, tokenizer, pretrain, serve]\nstorage: file://{runs}/store\n"
        "data:\n  sources: ['stdlib:docs']\n  val_fraction: 0.2\n" + LENIENT_QUALITY +
        "tokenizer: {vocab_size: 512, seq_len: 64}\n"
        f"pretrain: {{steps: {STEPS}, global_batch: 8, micro_batch: 2, warmup_steps: 2, lr: 3.0e-3,\n"
        f"           checkpoint_every: {EVERY}, eval_every: 12, scaling: {{num_workers: 2}}}}\n"
        # Moderation, Q&A and feedback are exercised on the full chain (tests/integration/serving/).
        f"serve: {{port: {port}, ingress: {{num_cpus: 0}}, moderation: {{enabled: false}}, feedback: {{enabled: false}},\n"
        "        models: [{name: base, source: pretrain, deployment: {num_cpus: 0}}]}\n"
    )
    return path


def _train_workers() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def _committed_step(checkpoints: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (its snapshot), if any."""
    try:
        snapshot = json.loads((checkpoints / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return ((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step")


def _logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_pipeline_killed_during_pretraining_resumes_from_its_checkpoint_on_rerun(ray_cluster, tmp_path):
    port = free_port()
    config = _write_recipe(tmp_path, port)
    stage_dir = tmp_path / "e2e" / "pretrain"
    # Ray Train checkpoints straight into the artifact store.
    checkpoints = tmp_path / "store" / "e2e" / "pretrain" / "ray_results" / "pretrain"
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen([*AERO, "pipeline", str(config)], cwd=REPO, stdout=out, env={**os.environ, **KEYS},
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while _committed_step(checkpoints) is None and time.monotonic() < deadline:
            assert first.poll() is None, f"the pipeline ended before a checkpoint:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        assert _committed_step(checkpoints), log.read_text()[-3000:]
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole `aero pipeline` process, as a lost terminal would
        first.wait()
    # Ray notices the dead driver and ends its job's workers.
    deadline = time.monotonic() + 60
    while _train_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _train_workers(), "the killed pipeline's training workers outlived it"
    assert read_manifest(stage_dir).status == "running"  # as the killed process left it
    done_before = _logged_steps(stage_dir / "metrics.jsonl")
    committed = _committed_step(checkpoints)
    assert committed < STEPS and max(done_before) >= committed

    rerun = aero("pipeline", str(config), timeout=600, env=KEYS)
    assert rerun.returncode == 0, rerun.stderr[-3000:] + rerun.stdout[-2000:]
    try:
        # On a cluster the pipeline leaves the model served and returns.
        assert f"serving base: http://127.0.0.1:{port}/v1" in rerun.stdout, rerun.stdout
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEYS["AERO_API_KEYS"], max_retries=0)
        done = client.completions.create(model="base", prompt="The for statement", max_tokens=4, temperature=0)
        assert done.usage.completion_tokens == 4 and done.choices[0].finish_reason == "length"
        status = aero("serve", str(config), "--status")
        assert status.returncode == 0, status.stderr
        assert "aero: RUNNING" in status.stdout and "llm-base: HEALTHY (replicas: 1 RUNNING)" in status.stdout, status.stdout
    finally:
        shutdown = aero("serve", str(config), "--shutdown")
    assert shutdown.returncode == 0 and "serve: shut down" in shutdown.stdout, shutdown.stderr
    assert "data: finished earlier with the same config and inputs; skipped" in rerun.stderr
    assert "tokenizer: finished earlier with the same config and inputs; skipped" in rerun.stderr
    assert "pretrain: last attempt is running; resuming" in rerun.stderr
    manifest = read_manifest(stage_dir)
    assert manifest.status == "finished" and manifest.metrics["step"] == STEPS
    resumed = _logged_steps(stage_dir / "metrics.jsonl")[len(done_before):]
    # The rerun starts after the last checkpoint the first attempt committed, not at step 1.
    assert resumed == list(range(committed + 1, STEPS + 1)), (committed, resumed)
    assert "report: " in rerun.stdout and "loss.png" in (tmp_path / "e2e" / "report.html").read_text()

    # Every finished stage is in the store; the checkpoints never were in the local folder.
    for stage in ("data", "tokenizer", "pretrain"):
        assert read_manifest(tmp_path / "store" / "e2e" / stage).status == "finished", stage
    assert (tmp_path / "store/e2e/pretrain/model/model.safetensors").is_file()
    assert not (stage_dir / "ray_results").exists()
    # A fresh node: no local run folder. Each stage comes back from the store instead of rerunning.
    shutil.rmtree(tmp_path / "e2e")
    again = aero("pipeline", str(config), "--no-serve", timeout=300)  # restoring is the point here
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("data", "tokenizer", "pretrain"):
        assert f"{stage}: finished in file://{tmp_path}/store/e2e/{stage}; downloaded" in again.stderr, again.stderr
        assert f"{stage}: finished earlier with the same config and inputs; skipped" in again.stderr
    assert "running ->" not in again.stderr
    assert read_manifest(stage_dir).metrics["step"] == STEPS
    model = Path(read_manifest(stage_dir).outputs["model"].path)
    assert hash_path(model) == read_manifest(stage_dir).outputs["model"].sha256
    chain = aero("runs", "show", "e2e", f"--runs-dir={tmp_path}", "--lineage")
    assert chain.returncode == 0 and "<- tokenizer: finished" in chain.stdout and "<- data: finished" in chain.stdout
    assert f"stored at file://{tmp_path}/store/e2e/pretrain" in chain.stdout

