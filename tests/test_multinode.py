"""Node failures on a real multi-node Ray cluster (a head and two worker nodes on this
machine, `tests/multinode_cluster.py`): a whole worker node is SIGKILLed mid-run, as a lost
machine, while `aero` runs as a user runs it against the cluster's address."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from tests.conftest import AERO, REPO, copy_corpus

pytestmark = pytest.mark.slow


class MultiNode:
    """The helper process that holds the cluster; `kill(name)` drops a node as a lost machine."""

    def __init__(self, spec: dict) -> None:
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests/multinode_cluster.py"), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        info = json.loads(self.proc.stdout.readline())
        self.address, self.nodes = info["address"], info["nodes"]

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def kill(self, name: str) -> None:
        assert self.send(f"kill {name}") == {"killed": name}

    def node_of(self, pid: int) -> str | None:
        """The worker node (by name) whose raylet started process `pid`."""
        raylets = {info["raylet_pid"]: name for name, info in self.nodes.items()}
        for parent in psutil.Process(pid).parents():
            if parent.pid in raylets:
                return raylets[parent.pid]
        return None

    def close(self) -> None:
        try:
            self.proc.communicate("quit\n", timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def three_nodes():
    cluster = MultiNode({"head": {"num_cpus": 0}, "workers": {"a": {"num_cpus": 2}, "b": {"num_cpus": 2}}})
    yield cluster
    cluster.close()


def _aero(cluster: MultiNode, *args: str) -> subprocess.Popen:
    """`aero ARGS --address` against the multi-node cluster, not the session's."""
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([*AERO, *args, "--address", cluster.address], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _train_workers(cluster: MultiNode) -> dict[int, str]:
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            node = cluster.node_of(p.pid)
            if node:
                out[p.pid] = node
    return out


def test_pretraining_survives_the_loss_of_a_worker_node_at_the_same_step_and_data(three_nodes, docs_corpus, tmp_path):
    runs = tmp_path / "runs"
    copy_corpus(docs_corpus, runs, "nodes")
    recipe = tmp_path / "nodes.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": "nodes", "runs_dir": str(runs), "stages": ["pretrain"],
        "pretrain": {"steps": 16, "global_batch": 8, "micro_batch": 2, "warmup_steps": 2, "lr": 3e-3,
                     "checkpoint_every": 4, "eval_every": 16, "max_failures": 2,
                     "scaling": {"num_workers": 2, "placement_strategy": "SPREAD"}},
    }))
    run = _aero(three_nodes, "run", "pretrain", str(recipe))
    storage = runs / "nodes/pretrain/ray_results/pretrain"
    _wait_for(lambda: list(storage.glob("checkpoint_*")), "the first checkpoint")
    workers = _wait_for(lambda: (w := _train_workers(three_nodes)) and len(w) == 2 and w, "two training workers")
    assert sorted(workers.values()) == ["a", "b"], f"workers not on different nodes: {workers}"
    three_nodes.kill("b")
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-3000:]
    assert "pretrain: finished" in output

    log = [json.loads(line) for line in (runs / "nodes/pretrain/metrics.jsonl").read_text().splitlines()]
    assert len(log) > 16, "no step was relogged: the workers did not restart from a checkpoint"
    restart = next(i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"])
    assert log[restart]["step"] - 1 in (4, 8, 12), "did not resume from the last checkpoint"
    final = {h["step"]: h for h in log}  # the run that finished
    assert sorted(final) == list(range(1, 17))
    # The data position continues: 2 micro-batches per step per worker, none repeated or skipped,
    # and each relogged step trained on the same batches as before the node was lost.
    assert [final[s]["consumed_micro_batches"] for s in range(1, 17)] == [2 * s for s in range(1, 17)]
    for before in log[:restart]:
        assert final[before["step"]]["batch_checksum"] == before["batch_checksum"], before["step"]
    manifest = json.loads((runs / "nodes/pretrain/manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["metrics"]["step"] == 16


def test_a_data_job_whose_node_dies_finishes_on_rerun_with_every_record_accounted_for(three_nodes, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "ray data streams blocks through tasks on every node of the cluster while the driver waits".split()
    for i in range(24):
        body = "\n\n".join(" ".join(words[(i + j) % len(words):] + words[: (i + j) % len(words)]) + f" part {i} {j}."
                           for j in range(40))
        (corpus / f"doc{i:02d}.txt").write_text(body)
    (corpus / "empty.txt").write_text("")  # rejected, and counted
    recipe = tmp_path / "data.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": "nodes", "runs_dir": str(tmp_path / "runs"), "stages": ["data"],
        "data": {"sources": [str(corpus)], "part_bytes": 8000, "val_fraction": 0.2,
                 "dedup": {"exact": False, "near": False},
                 "quality": {"gopher_quality": {"enabled": False}, "gopher_repetition": {"enabled": False},
                             "c4": {"enabled": False}, "language": {"enabled": False}}},
    }))
    stage = tmp_path / "runs/nodes/data"
    first = _aero(three_nodes, "run", "data", str(recipe))
    _wait_for(lambda: list((stage / "parts_done").glob("part-*")) if (stage / "parts_done").exists() else [],
              "the first finished part")
    three_nodes.kill("b")
    first.communicate(timeout=600)
    # Whether Ray retried the lost node's tasks or the run failed, a rerun finishes the job.
    second = _aero(three_nodes, "run", "data", str(recipe))
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    assert "data: finished" in output
    documents = pd.read_parquet(stage / "documents")
    rejects = pd.read_parquet(stage / "rejects")
    assert documents["doc_id"].is_unique and len(documents) == 24
    assert sorted(Path(s).name for s in documents["source"]) == sorted(f"doc{i:02d}.txt" for i in range(24))
    assert list(rejects["source"].map(lambda s: Path(s).name)) == ["empty.txt"]
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["documents_in"] == len(documents) + len(rejects) == 25 and stats["documents_out"] == 24
