"""A run's stage folders mirrored to an artifact store: any URI pyarrow's filesystems
understand (`s3://bucket/prefix?region=...`, `gs://...`, `hdfs://...`, `abfs://...`,
`file:///shared/...`).

Why: on a cluster without a shared filesystem, each stage may run on another node (one Ray
job per stage). The store is where stages meet: a finished stage's folder is uploaded
(its manifest last, so a manifest in the store means a complete folder), a stage whose
upstream folder is not on its node downloads it first, and a stage finished in the store
with the same fingerprint is restored instead of rerun. Ray Train and Ray Tune write their
checkpoints straight into the store (`storage_path` takes the same URIs), so a rerun on any
node resumes from them. The I/O is pyarrow's `copy_files`, the layer Ray Train uses for its
own storage; this module only maps a run's stage to a URI.
"""

from __future__ import annotations

from pathlib import Path

from cluster.errors import UserError
from cluster.manifest import MANIFEST_NAME, Manifest, write_manifest

# Stays where it was written: Ray Train / Tune already put their checkpoints in the store.
LOCAL_ONLY = ("ray_results",)


def join_uri(uri: str, *parts: str) -> str:
    """`uri`/parts/..., keeping a query (an S3 endpoint or region) at the end; local paths too."""
    base, sep, query = uri.partition("?") if "://" in uri else (uri, "", "")
    return "/".join([base.rstrip("/"), *parts]) + (sep + query if sep else "")


def parse_store_uri(uri: str):
    """(pyarrow filesystem, root path) for `uri`, or a clear error naming it."""
    import pyarrow.fs

    if "://" not in uri:
        raise UserError(f"storage {uri!r}: expected a URI such as s3://bucket/prefix or file:///shared/runs "
                        "(a shared folder needs no store: point runs_dir at it)")
    try:
        fs, root = pyarrow.fs.FileSystem.from_uri(uri)
    except Exception as exc:  # ArrowInvalid, OSError: unknown scheme, bad query, no credentials
        raise UserError(f"storage {uri!r}: pyarrow cannot open it: {exc}") from None
    return fs, root.rstrip("/")


class ArtifactStore:
    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self.fs, self.root = parse_store_uri(self.uri)

    def stage_uri(self, run: str, stage: str, *rest: str) -> str:
        """Where the stage's folder (or a path in it) lives in the store; query parameters, e.g.
        an S3 endpoint, are kept."""
        return join_uri(self.uri, run, stage, *rest)

    def _path(self, run: str, stage: str, *rest: str) -> str:
        return "/".join([self.root, run, stage, *rest])

    def read_manifest(self, run: str, stage: str) -> Manifest | None:
        import pyarrow.fs

        path = self._path(run, stage, MANIFEST_NAME)
        if self.fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with self.fs.open_input_stream(path) as f:
            return Manifest.model_validate_json(f.read().decode("utf-8"))

    def push(self, stage_dir: Path, run: str, stage: str) -> str:
        """Upload a finished stage's folder, the manifest last; returns its URI."""
        import pyarrow.fs

        local = pyarrow.fs.LocalFileSystem()
        self.fs.create_dir(self._path(run, stage), recursive=True)
        for item in sorted(Path(stage_dir).iterdir()):
            if item.name in LOCAL_ONLY or item.name == MANIFEST_NAME:
                continue
            target = self._path(run, stage, item.name)
            if item.is_dir():
                self.fs.create_dir(target, recursive=True)
            pyarrow.fs.copy_files(str(item.resolve()), target, source_filesystem=local, destination_filesystem=self.fs)
        pyarrow.fs.copy_files(str((Path(stage_dir) / MANIFEST_NAME).resolve()), self._path(run, stage, MANIFEST_NAME),
                              source_filesystem=local, destination_filesystem=self.fs)
        return self.stage_uri(run, stage)

    def pull(self, run: str, stage: str, stage_dir: Path) -> Manifest | None:
        """Download the stage's folder if the store has a finished one; its manifest, else None."""
        import pyarrow.fs

        manifest = self.read_manifest(run, stage)
        if manifest is None or manifest.status != "finished":
            return None
        stage_dir = Path(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        local = pyarrow.fs.LocalFileSystem()
        for info in self.fs.get_file_info(pyarrow.fs.FileSelector(self._path(run, stage))):
            name = info.path.rsplit("/", 1)[-1]
            if name in LOCAL_ONLY or name == MANIFEST_NAME:
                continue
            target = str((stage_dir / name).resolve())
            if info.type == pyarrow.fs.FileType.Directory:
                local.create_dir(target, recursive=True)
            pyarrow.fs.copy_files(info.path, target, source_filesystem=self.fs, destination_filesystem=local)
        write_manifest(stage_dir, manifest)
        return manifest
