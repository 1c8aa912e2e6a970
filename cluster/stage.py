"""The contract between the pipeline runner and a stage.

A stage module (in `data_jobs/`, `jobs/`, `serve/`) exposes `STAGE = Stage(...)`: its
config model, a `run(ctx, config)` function that runs in the driver and uses Ray for the
heavy work (Ray Data, Ray Train, Ray Serve), the stages whose outputs it reads, and
optionally a function that hashes its outside inputs (source files). Stage modules keep
heavy imports inside functions so that validating a recipe stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from cluster.errors import UserError
from cluster.manifest import Manifest, hash_path, read_manifest


def is_folder_ref(ref: str) -> bool:
    """A recipe reference that names a folder (has a slash, or exists) rather than a stage."""
    return "/" in ref or Path(ref).is_dir()


@dataclass
class StageResult:
    """What a finished stage hands back: named output paths (hashed into the manifest) and metrics."""

    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Where a stage writes (`stage_dir`) and how it finds what earlier stages wrote."""

    name: str
    run: str
    run_dir: Path
    stage_dir: Path
    # Another stage's validated config from the same recipe (the `tune` stage searches over one).
    stage_config: Callable[[str], Any] | None = None
    # The recipe's artifact store URI, if any (cluster/artifact_store.py).
    storage: str | None = None

    @property
    def checkpoint_storage(self) -> str:
        """Ray Train / Tune `storage_path`: the stage's `ray_results` in the artifact store when
        the recipe has one (so a rerun on any node resumes), else in the stage folder."""
        if self.storage:
            from cluster.artifact_store import ArtifactStore

            return ArtifactStore(self.storage).stage_uri(self.run, self.name, "ray_results")
        return str((self.stage_dir / "ray_results").resolve())

    def upstream(self, stage: str) -> Manifest:
        """The finished manifest of an earlier stage of this run, or a clear error."""
        manifest = read_manifest(self.run_dir / stage)
        if manifest is None or manifest.status != "finished":
            state = "has not run" if manifest is None else f"is {manifest.status}"
            raise UserError(
                f"stage {self.name!r} needs stage {stage!r} of run {self.run!r}, which {state} "
                f"(looked in {self.run_dir / stage}); run it first: aero run {stage} CONFIG"
            )
        return manifest

    def upstream_output(self, stage: str, output: str) -> Path:
        manifest = self.upstream(stage)
        if output not in manifest.outputs:
            raise UserError(f"stage {stage!r} of run {self.run!r} has no output {output!r}")
        return Path(manifest.outputs[output].path)

    def resolve(self, ref: str, output: str) -> Path:
        """A recipe reference -> a path: a folder as given, a stage name -> that stage's `output`."""
        return Path(ref).expanduser() if is_folder_ref(ref) else self.upstream_output(ref, output)

    def model_dir(self, ref: str) -> Path:
        """A stage name -> its exported `model`; a folder -> itself. Either must hold a config.json."""
        path = self.resolve(ref, "model")
        if not (path / "config.json").is_file():
            raise UserError(f"stage {self.name!r}: {path} is not a Hugging Face model folder (no config.json)")
        return path

    def fingerprints(self, refs) -> dict[str, str]:
        """Input hashes of recipe references, so a changed upstream reruns the stage: a stage ->
        `stage:NAME` its outputs' id, a folder -> `path:PATH` its content hash."""
        out: dict[str, str] = {}
        for ref in refs:
            if is_folder_ref(ref):
                out[f"path:{ref}"] = hash_path(Path(ref).expanduser())
            else:
                out[f"stage:{ref}"] = self.upstream(ref).output_id
        return out


def _no_outside_inputs(ctx: StageContext, config: Any) -> dict[str, str]:
    return {}


@dataclass(frozen=True)
class Stage:
    name: str
    config_model: type[BaseModel]
    run: Callable[[StageContext, Any], StageResult]
    needs: tuple[str, ...] = ()
    outside_inputs: Callable[[StageContext, Any], dict[str, str]] = _no_outside_inputs
    description: str = ""
    # Run even when finished with the same inputs: its work is a running service, not a file.
    always_run: bool = False
    # (recipe, config) -> list[cluster.plan.WorkerNeed]: what its workers need (the planner).
    memory: Callable[[Any, Any], list] | None = None
