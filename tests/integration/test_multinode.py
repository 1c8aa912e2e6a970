"""Node failures on a real multi-node Ray cluster: the session's head plus worker nodes that
join it the way a machine joins a cluster (`ray start --address=HEAD`), each with its own
raylet, object store and agents. A node is lost by SIGKILLing every process it runs, as when
a machine dies; a replacement joins as an autoscaler would add one. `aero` runs as a user
runs it, against the cluster's address."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from cluster.ray_session import ray_cli
from tests.conftest import AERO, REPO, copy_corpus, free_port

pytestmark = pytest.mark.slow

# Work meant for the worker nodes asks for this resource; the head has none of it.
POOL = "multinode_pool"


class WorkerNodes:
    """Worker nodes joined to the session's cluster; `kill(name)` loses one like a dead machine."""

    def __init__(self, address: str, logs: Path) -> None:
        self.address, self.logs = address, logs
        self.procs: dict[str, subprocess.Popen] = {}

    def add(self, name: str, cpus: int = 2, pool: int = 2) -> None:
        log = self.logs / f"ray-start-{name}.log"
        self.procs[name] = subprocess.Popen(
            [ray_cli(), "start", f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0",
             f"--resources={json.dumps({POOL: pool, f'node_{name}': 1})}", f"--object-store-memory={200 << 20}",
             "--disable-usage-stats", "--block"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        import ray

        def joined() -> bool:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"ray start for node {name} exited: {log.read_text()[-2000:]}")
            return any(n["Alive"] and n["Resources"].get(f"node_{name}") for n in ray.nodes())

        _wait_for(joined, f"node {name} to join", timeout=120)

    def pids(self, name: str) -> set[int]:
        proc = psutil.Process(self.procs[name].pid)
        return {proc.pid, *(c.pid for c in proc.children(recursive=True))}

    def node_of(self, pid: int) -> str | None:
        return next((name for name in self.procs if pid in self.pids(name)), None)

    def kill(self, name: str) -> None:
        """SIGKILL the node's raylet, object store, agents and workers at once."""
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs.pop(name).wait(timeout=30)

    def close(self) -> None:
        """Lose every node, then wait until the head has marked them dead: until then it may
        still place the next module's tasks on them (a Ray Data reader there died with its node)."""
        import ray

        names = list(self.procs)
        for name in names:
            self.kill(name)
        _wait_for(lambda: not any(n["Alive"] and any(n["Resources"].get(f"node_{x}") for x in names)
                                  for n in ray.nodes()), "the lost nodes to be marked dead", timeout=180)


def _wait_for(predicate, what: str, timeout: float = 300, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def worker_nodes(ray_cluster, tmp_path_factory):
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"])
    pool = WorkerNodes(ray_cluster["address"], tmp_path_factory.mktemp("nodes"))
    pool.add("a")
    pool.add("b")
    yield pool
    pool.close()


@pytest.fixture
def nodes(worker_nodes):
    """Worker nodes `a` and `b`; a test may lose one and add `c`, and gets `a` + `b` back after."""
    yield worker_nodes
    if "c" in worker_nodes.procs:
        worker_nodes.kill("c")
    for name in ("a", "b"):
        if name not in worker_nodes.procs:
            worker_nodes.add(name)


def _aero(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*AERO, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_workers(nodes: WorkerNodes) -> dict[int, str | None]:
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
            found[p.pid] = nodes.node_of(p.pid)
    return found


def test_pretraining_survives_the_loss_of_a_worker_node_at_the_same_step_and_data(nodes, docs_corpus, tmp_path):
    runs = tmp_path / "runs"
    copy_corpus(docs_corpus, runs, "nodes")
    recipe = tmp_path / "nodes.yaml"
    steps = 16
    recipe.write_text(yaml.safe_dump({
        "run": "nodes", "runs_dir": str(runs), "stages": ["pretrain"],
        "pretrain": {"steps": steps, "global_batch": 8, "micro_batch": 2, "warmup_steps": 2, "lr": 3e-3,
                     "checkpoint_every": 4, "eval_every": steps, "log_every": 1, "max_failures": 2,
                     "scaling": {"num_workers": 2, "placement_strategy": "SPREAD", "resources": {POOL: 1}}},
    }))
    run = _aero("run", "pretrain", str(recipe))
    storage = runs / "nodes/pretrain/ray_results/pretrain"
    workers = _wait_for(lambda: (w := _train_workers(nodes)) and len(w) == 2 and w, "two training workers")
    assert sorted(map(str, workers.values())) == ["a", "b"], f"workers not on the two worker nodes: {workers}"
    _wait_for(lambda: list(storage.glob("checkpoint_*")) and (storage / "checkpoint_manager_snapshot.json").exists(),
              "the first committed checkpoint")
    nodes.kill("b")
    nodes.add("c")  # the autoscaler's replacement machine
    output, _ = run.communicate(timeout=600)
    assert run.returncode == 0, output[-3000:]
    assert "pretrain: finished" in output

    log = [json.loads(line) for line in (runs / "nodes/pretrain/metrics.jsonl").read_text().splitlines()]
    log = [h for h in log if "batch_checksum" in h]
    restart = next((i for i in range(1, len(log)) if log[i]["step"] <= log[i - 1]["step"]), None)
    assert restart is not None, "no step was relogged: the workers did not restart from a checkpoint"
    assert (log[restart]["step"] - 1) % 4 == 0, "did not resume from a checkpoint's step"
    final = {h["step"]: h for h in log}  # the attempt that finished
    assert sorted(final) == list(range(1, steps + 1))
    # The data position continues: 2 micro-batches per step per worker, none repeated or skipped,
    # and each relogged step trained on the same batches as before the node was lost.
    assert [final[s]["consumed_micro_batches"] for s in range(1, steps + 1)] == [2 * s for s in range(1, steps + 1)]
    for before in log[:restart]:
        assert final[before["step"]]["batch_checksum"] == before["batch_checksum"], before["step"]
    manifest = json.loads((runs / "nodes/pretrain/manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["metrics"]["step"] == steps


def _cleaning_node(nodes: WorkerNodes, job: subprocess.Popen) -> str | None:
    """The worker node where a Ray Data cleaning task is running, if any."""
    assert job.poll() is None, "the data job ended before a cleaning task was seen on a worker node"
    for name in list(nodes.procs):
        for pid in nodes.pids(name):
            try:
                if "clean_files" in " ".join(psutil.Process(pid).cmdline()):
                    return name
            except psutil.NoSuchProcess:
                pass
    return None


def test_a_data_job_whose_node_dies_finishes_on_rerun_with_every_record_accounted_for(nodes, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = "ray data streams blocks through tasks on every node of the cluster while the driver waits".split()
    for i in range(48):
        # ~40 KB each: cleaning tasks that last long enough to be seen (and lost) mid-run
        body = "\n\n".join(" ".join(words[(i + j) % len(words):] + words[: (i + j) % len(words)]) + f" part {i} {j}."
                           for j in range(400))
        (corpus / f"doc{i:02d}.txt").write_text(body)
    (corpus / "empty.txt").write_text("")  # rejected, and counted
    recipe = tmp_path / "data.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": "nodes", "runs_dir": str(tmp_path / "runs"), "stages": ["data"],
        "data": {"sources": [str(corpus)], "part_bytes": 400000, "blocks_per_part": 4, "val_fraction": 0.2,
                 "task_resources": {POOL: 1},  # cleaning runs on the worker nodes only
                 "dedup": {"exact": False, "near": False},
                 "quality": {"gopher_quality": {"enabled": False}, "gopher_repetition": {"enabled": False},
                             "c4": {"enabled": False}, "language": {"enabled": False}}},
    }))
    stage = tmp_path / "runs/nodes/data"
    first = _aero("run", "data", str(recipe))
    nodes.kill(_wait_for(lambda: _cleaning_node(nodes, first), "a cleaning task on a worker node", every=0.05))
    first_output, _ = first.communicate(timeout=600)
    cleaned_before = len(list((stage / "parts_done").glob("part-*")))
    # Whether Ray retried the lost node's tasks or the run failed, a rerun finishes the job and
    # keeps the parts already cleaned.
    second = _aero("run", "data", str(recipe))
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, first_output[-3000:] + output[-3000:]
    assert "data: finished" in output
    if first.returncode != 0 and cleaned_before:
        assert output.count("already cleaned; kept") == cleaned_before, output[-3000:]
    documents = pd.read_parquet(stage / "documents")
    rejects = pd.concat([pd.read_json(f, lines=True) for f in sorted((stage / "rejects").glob("*.json"))])
    assert documents["doc_id"].is_unique and len(documents) == 48
    assert sorted(Path(s).name for s in documents["source"]) == sorted(f"doc{i:02d}.txt" for i in range(48))
    assert list(rejects["source"].map(lambda s: Path(s).name)) == ["empty.txt"]
    stats = json.loads((stage / "stats.json").read_text())
    assert stats["documents_in"] == len(documents) + len(rejects) == 49 and stats["documents_out"] == 48


def _replica_nodes(app: str) -> dict[str, list[str]]:
    """{deployment: [node name of each live replica]}, node names from the `node_NAME` resources."""
    import ray
    from ray.util.state import list_actors

    names = {n["NodeID"]: next((k.removeprefix("node_") for k in n["Resources"] if k.startswith("node_")), "head")
             for n in ray.nodes()}
    out: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if actor.class_name.startswith(f"ServeReplica:{app}:"):
            out.setdefault(actor.class_name.split(":", 2)[2], []).append(names.get(actor.node_id, "?"))
    return out


def _running(app: str, deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    return int(states.get("RUNNING", 0))


def test_serving_keeps_answering_when_the_node_of_one_of_two_model_replicas_dies(nodes, post_run, tmp_path):
    import httpx
    from ray import serve

    port = free_port()
    db = tmp_path / "feedback.db"
    recipe = tmp_path / "serve.yaml"
    recipe.write_text(yaml.safe_dump({
        "run": "serve-nodes", "runs_dir": str(tmp_path / "runs"), "stages": ["serve"],
        "serve": {
            "app_name": "nodes", "port": port, "auth": {"enabled": False},
            "moderation": {"enabled": False}, "pages": {"enabled": False}, "check": {"enabled": False},
            "feedback": {"database": f"sqlite:///{db}"}, "request_timeout_s": 90,
            # The gateway (and the feedback store) stays on the head; each model replica needs a whole
            # worker node's pool, so the two replicas land on different nodes.
            "ingress": {"num_cpus": 0, "resources": {"node:__internal_head__": 0.01},
                        "max_ongoing_requests": 64, "max_queued_requests": 64},
            # nobind: the "nodes" share this machine's cores, and vLLM's auto binding would put every
            # engine on the same core (a replacement starved by a busy survivor starts in minutes).
            "models": [{"name": "sft", "source": str(post_run / "sft" / "model"), "default_max_tokens": 8,
                        "cpu_threads": "nobind",
                        "deployment": {"num_cpus": 0.1, "resources": {POOL: 2}, "max_ongoing_requests": 8,
                                       "max_queued_requests": 8, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}}],
        },
    }))
    deployed = subprocess.run([*AERO, "run", "serve", str(recipe)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    try:
        replicas = _replica_nodes("nodes")
        llm = next(d for d in replicas if d != "gateway")
        assert sorted(replicas[llm]) == ["a", "b"] and replicas["gateway"] == ["head"], replicas

        base = f"http://127.0.0.1:{port}/v1"
        results: list[tuple[str, int]] = []  # (what, HTTP status) of every request sent
        rated: list[str] = []  # reply ids whose rating the gateway acknowledged
        stop = threading.Event()

        def client(i: int) -> None:
            with httpx.Client(timeout=120) as http:  # a request that hangs fails the test here
                while not stop.is_set():
                    r = http.post(f"{base}/chat/completions", json={
                        "model": "sft", "store": True, "max_tokens": 8,
                        "messages": [{"role": "user", "content": f"What is a list? ({i}, {len(results)})"}]})
                    results.append(("chat", r.status_code))
                    if r.status_code == 200:
                        f = http.post(f"{base}/feedback", json={"id": r.json()["id"], "index": 0, "rating": "up"})
                        results.append(("feedback", f.status_code))
                        if f.status_code == 200:
                            rated.append(r.json()["id"])
                    elif r.status_code in (429, 503):
                        time.sleep(float(r.headers.get("retry-after", 1)))
                    time.sleep(0.2)  # steady, not saturating: the replacement replica starts on the same cores

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        _wait_for(lambda: len(rated) >= 3, "answers before the node is lost", timeout=120)
        nodes.kill("b")
        lost_at = len(results)
        nodes.add("c")  # the autoscaler's replacement machine
        _wait_for(lambda: _running("nodes", llm) == 2 and sorted(_replica_nodes("nodes").get(llm, [])) == ["a", "c"],
                  "the lost replica to come back on the new node", timeout=400)
        back_at = len(results)
        _wait_for(lambda: sum(1 for w, s in results[back_at:] if w == "chat" and s == 200) >= 3,
                  "answers after the replica came back", timeout=120)
        stop.set()
        for t in threads:
            t.join(timeout=150)
        assert not any(t.is_alive() for t in threads), "a client hung"
        statuses = {s for _, s in results}
        assert statuses <= {200, 429, 503}, sorted(results)
        assert any(s == 200 for w, s in results[lost_at:back_at] if w == "chat"), \
            "the surviving replica answered nothing while the other was down"
        with sqlite3.connect(db) as conn:
            stored = {row[0] for row in conn.execute("SELECT reply_id FROM ratings")}
        assert stored == set(rated) and len(rated) >= 6  # every acknowledged rating is in the database
    finally:
        serve.shutdown()
