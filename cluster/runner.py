"""Runs stages: skips a stage whose finished manifest has the same fingerprint, resumes one
that failed or was killed (its folder is kept for its checkpoints), and starts afresh when
the config or inputs changed. With an artifact store (`storage:` in the recipe), upstream
folders missing on this node are downloaded from it, a stage finished there is restored
instead of rerun, and each finished stage is uploaded."""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from typing import Callable

from cluster.artifact_store import ArtifactStore
from cluster.config import Recipe
from cluster.manifest import (
    Artifact,
    Manifest,
    fingerprint,
    hash_path,
    read_manifest,
    utc_now,
    write_manifest,
)
from cluster.ray_session import connect_ray
from cluster.stage import StageContext
from cluster.stages import load_stage
from cluster.versions import git_commit, package_versions


def _echo(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def stage_context(recipe: Recipe, name: str) -> StageContext:
    return StageContext(
        name=name, run=recipe.run, run_dir=recipe.run_dir, stage_dir=recipe.run_dir / name,
        stage_config=recipe.stage_config, storage=recipe.storage,
    )


def _restore_upstream(store: ArtifactStore, ctx: StageContext, need: str, echo: Callable[[str], None]) -> None:
    """Download an upstream stage's folder from the store when this node has no finished one."""
    local = read_manifest(ctx.run_dir / need)
    if local is not None and local.status == "finished":
        return
    if store.pull(ctx.run, need, ctx.run_dir / need) is not None:
        echo(f"aero: {need}: downloaded from {store.stage_uri(ctx.run, need)}")


def run_stage(recipe: Recipe, name: str, *, echo: Callable[[str], None] = _echo) -> Manifest:
    """Run one stage of the recipe's run (or skip it when already finished with the same inputs)."""
    stage = load_stage(name)
    config = recipe.stage_config(name)
    ctx = stage_context(recipe, name)
    store = ArtifactStore(recipe.storage) if recipe.storage else None
    for need in stage.needs if store else ():
        _restore_upstream(store, ctx, need, echo)
    inputs = {f"stage:{need}": ctx.upstream(need).output_id for need in stage.needs}
    inputs.update(stage.outside_inputs(ctx, config))
    config_json = config.model_dump(mode="json")
    print_ = fingerprint(name, config_json, inputs)

    previous = read_manifest(ctx.stage_dir)
    done_here = previous is not None and previous.fingerprint == print_ and previous.status == "finished"
    if store is not None and not done_here and not stage.always_run:
        stored = store.read_manifest(recipe.run, name)
        if stored is not None and stored.status == "finished" and stored.fingerprint == print_:
            shutil.rmtree(ctx.stage_dir, ignore_errors=True)
            previous = store.pull(recipe.run, name, ctx.stage_dir)
            echo(f"aero: {name}: finished in {store.stage_uri(recipe.run, name)}; downloaded")
    if previous is not None and previous.fingerprint == print_ and previous.status == "finished" and not stage.always_run:
        echo(f"aero: {name}: finished earlier with the same config and inputs; skipped")
        return previous
    if previous is not None and previous.fingerprint != print_ and ctx.stage_dir.exists():
        echo(f"aero: {name}: config or inputs changed since the last run; starting afresh")
        shutil.rmtree(ctx.stage_dir)
    elif previous is not None:
        echo(f"aero: {name}: last attempt is {previous.status}; resuming")

    connect_ray(recipe.ray)
    manifest = Manifest(
        stage=name, run=recipe.run, status="running", fingerprint=print_, config=config_json,
        inputs=inputs, versions=package_versions(), git_commit=git_commit(), started_at=utc_now(),
    )
    ctx.stage_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(ctx.stage_dir, manifest)
    echo(f"aero: {name}: running -> {ctx.stage_dir}")
    start = time.monotonic()
    try:
        result = stage.run(ctx, config)
    except BaseException as exc:
        manifest.status = "failed"
        manifest.ended_at = utc_now()
        manifest.error = "".join(traceback.format_exception_only(type(exc), exc)).strip() or type(exc).__name__
        write_manifest(ctx.stage_dir, manifest)
        raise
    manifest.outputs = {
        key: Artifact(path=str(path), sha256=hash_path(path)) for key, path in result.outputs.items()
    }
    manifest.metrics = {**result.metrics, "wall_s": round(time.monotonic() - start, 3)}
    manifest.status = "finished"
    manifest.ended_at = utc_now()
    if store is not None:
        manifest.stored_at = store.stage_uri(recipe.run, name)
    write_manifest(ctx.stage_dir, manifest)
    if store is not None and not stage.always_run:
        store.push(ctx.stage_dir, recipe.run, name)
        echo(f"aero: {name}: uploaded to {manifest.stored_at}")
    echo(f"aero: {name}: finished in {manifest.metrics['wall_s']:.1f}s")
    return manifest


def run_pipeline(recipe: Recipe, *, echo: Callable[[str], None] = _echo) -> list[Manifest]:
    """Run the recipe's stages in order; stop at the first failure."""
    from cluster.plan import capacity_for, preflight, unfinished

    if not recipe.stages:
        echo(f"aero: recipe {recipe.source or recipe.run} lists no stages; nothing to run")
    todo = unfinished(recipe)
    if todo:
        capacity = capacity_for(recipe)
        needs = preflight(recipe, capacity, todo)
        echo(f"aero: pre-flight: {len(needs)} worker kinds of {len(todo)} stages fit {capacity.source}")
    return [run_stage(recipe, name, echo=echo) for name in recipe.stages]
