"""What a deployed `serve` stage wrote about itself (`endpoint.json`): its URLs and where its
audit log and feedback database are. Commands read those paths here rather than working them
out from the recipe a second time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.config import Recipe
from cluster.errors import UserError
from cluster.manifest import read_manifest


def read_endpoint(recipe: Recipe) -> dict[str, Any]:
    """The serve stage's endpoint.json of this recipe's run, or a clear error when it never ran."""
    stage_dir = recipe.run_dir / "serve"
    manifest = read_manifest(stage_dir)
    path = Path(manifest.outputs["endpoint"].path) if manifest and "endpoint" in manifest.outputs else None
    if path is None or not path.is_file():
        raise UserError(f"run {recipe.run!r} has no deployed serve stage (no endpoint.json in {stage_dir}); "
                        "run `aero serve CONFIG` first, or give the file itself")
    return json.loads(path.read_text())
