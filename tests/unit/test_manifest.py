"""Manifests are atomic, a torn one reads as absent, fingerprints follow what a stage wrote, and
the artifact store round-trips a stage folder."""

from __future__ import annotations

import os

import pytest

from cluster.manifest import Manifest, read_manifest, utc_now, write_manifest


def _manifest(status: str) -> Manifest:
    return Manifest(stage="s", run="r", status=status, fingerprint="f", config={}, started_at=utc_now())


def test_manifest_write_is_atomic_when_killed_mid_write(tmp_path, monkeypatch):
    write_manifest(tmp_path, _manifest("running"))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed between write and rename")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_manifest(tmp_path, _manifest("finished"))
    monkeypatch.undo()
    assert read_manifest(tmp_path).status == "running"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temp file left


def test_torn_manifest_reads_as_absent(tmp_path):
    (tmp_path / "manifest.json").write_text('{"stage": "s", "status": "fini')
    assert read_manifest(tmp_path) is None


def test_later_stages_depend_on_what_a_stage_wrote_not_only_on_its_config():
    """A stage rerun with the same config that writes different outputs (new code) changes
    the id that later stages fingerprint, so they rerun too."""
    from cluster.manifest import Artifact

    base = dict(stage="chat_data", run="r", status="finished", fingerprint="f" * 64, config={}, started_at=utc_now())
    first = Manifest(**base, outputs={"sft_train": Artifact(path="a", sha256="1" * 64)})
    same = Manifest(**base, outputs={"sft_train": Artifact(path="a", sha256="1" * 64)})
    rewritten = Manifest(**base, outputs={"sft_train": Artifact(path="a", sha256="2" * 64)})
    assert first.output_id == same.output_id != rewritten.output_id


def test_artifact_store_round_trips_a_stage_folder_manifest_last_and_names_bad_uris(tmp_path):
    from cluster.artifact_store import ArtifactStore
    from cluster.config import build_recipe
    from cluster.errors import ConfigError, UserError

    stage_dir = tmp_path / "local" / "r" / "s"
    (stage_dir / "model").mkdir(parents=True)
    (stage_dir / "model" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (stage_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    (stage_dir / "ray_results" / "ckpt").mkdir(parents=True)  # already in the store when a store is set
    write_manifest(stage_dir, _manifest("finished"))
    store = ArtifactStore(f"file://{tmp_path}/store/")
    assert store.push(stage_dir, "r", "s") == f"file://{tmp_path}/store/r/s"
    assert (tmp_path / "store/r/s/model/weights.bin").read_bytes() == b"\x00\x01" * 100
    assert not (tmp_path / "store/r/s/ray_results").exists()
    fresh = tmp_path / "fresh" / "r" / "s"
    assert store.pull("r", "s", fresh).status == "finished"
    assert (fresh / "metrics.jsonl").read_text() == '{"step": 1}\n' and read_manifest(fresh).fingerprint == "f"
    # A folder whose manifest is not finished (an upload cut short, a failed stage) is not restored.
    write_manifest(tmp_path / "store/r/s", _manifest("running"))
    assert store.pull("r", "s", tmp_path / "again" / "s") is None and not (tmp_path / "again").exists()
    assert store.read_manifest("r", "missing") is None
    # Object-store URIs keep their query (endpoint, region) at the end; nothing is contacted here.
    s3 = ArtifactStore("s3://bucket/runs?region=us-east-1&endpoint_override=127.0.0.1:9000")
    assert s3.stage_uri("r", "pretrain", "ray_results") == \
        "s3://bucket/runs/r/pretrain/ray_results?region=us-east-1&endpoint_override=127.0.0.1:9000"
    with pytest.raises(UserError, match="storage 'foo://x': pyarrow cannot open it"):
        ArtifactStore("foo://x")
    with pytest.raises(ConfigError, match="storage: Value error, must be a URI such as s3://"):
        build_recipe({"run": "x", "storage": "runs/shared"})

