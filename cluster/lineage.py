"""Lineage and comparison of runs, read from their manifests only.

Each stage's manifest records the stages it read (`stage:NAME` inputs, pinned to the output
id each had) and its outside inputs (source files, labeled sets: their hashes). Following
the `stage:` links from any stage gives the chain back to the corpus sources. An upstream
that was rerun since (its output id no longer matches the one recorded) is marked stale.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.errors import UserError
from cluster.manifest import Manifest, read_manifest


def run_manifests(run_dir: Path) -> dict[str, Manifest]:
    """Stage name -> manifest, in the order the stages started."""
    found = [m for d in sorted(run_dir.iterdir()) if d.is_dir() and (m := read_manifest(d))]
    return {m.stage: m for m in sorted(found, key=lambda m: m.started_at)}


def config_hash(m: Manifest) -> str:
    return hashlib.sha256(json.dumps(m.config, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Node:
    stage: str
    manifest: Manifest | None
    recorded: str | None = None  # the output id the child recorded for this stage
    parents: list["Node"] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def stale(self) -> bool:
        return self.manifest is not None and self.recorded is not None and self.manifest.output_id != self.recorded

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"stage": self.stage, "status": m.status if m else "missing", "stale": self.stale,
                "config_sha256": config_hash(m) if m else None, "config": m.config if m else None,
                "outputs": {k: a.model_dump() for k, a in m.outputs.items()} if m else {},
                "stored_at": m.stored_at if m else None,
                "sources": self.sources, "parents": [p.to_dict() for p in self.parents]}


def lineage(run_dir: Path, stage: str | None = None) -> Node:
    """The chain behind `stage` (default: `serve` if the run has it, else its last stage)."""
    manifests = run_manifests(run_dir)
    if not manifests:
        raise UserError(f"{run_dir}: no stage manifests")
    stage = stage or ("serve" if "serve" in manifests else list(manifests)[-1])
    if stage not in manifests:
        raise UserError(f"run {run_dir.name!r} has no stage {stage!r} (it has {', '.join(manifests)})")

    def build(name: str, recorded: str | None) -> Node:
        m = manifests.get(name)
        node = Node(name, m, recorded)
        if m is None:
            return node
        for key, value in m.inputs.items():
            if key.startswith("stage:"):
                node.parents.append(build(key.removeprefix("stage:"), value))
            else:
                node.sources[key] = value
        return node

    return build(stage, None)


def render(node: Node) -> list[str]:
    """The chain as indented lines; a stage reached twice is shown in full once."""
    lines: list[str] = []
    shown: set[str] = set()

    def walk(n: Node, depth: int) -> None:
        pad = "    " * depth + ("<- " if depth else "")
        m = n.manifest
        if m is None:
            lines.append(f"{pad}{n.stage}: MISSING (recorded output {n.recorded[:12] if n.recorded else '?'})")
            return
        flag = "  STALE: rerun since this was read" if n.stale else ""
        if n.stage in shown:
            lines.append(f"{pad}{n.stage} (above){flag}")
            return
        shown.add(n.stage)
        lines.append(f"{pad}{n.stage}: {m.status}  config {config_hash(m)}  output {m.output_id[:12]}  "
                     f"{m.ended_at or m.started_at}{flag}")
        inner = "    " * (depth + 1)
        if m.stored_at:
            lines.append(f"{inner}stored at {m.stored_at}")
        for key, art in m.outputs.items():
            lines.append(f"{inner}out {key}: {art.path}  sha256 {art.sha256[:12]}")
        for key, value in n.sources.items():
            lines.append(f"{inner}source {key}: sha256 {value[:12]}")
        for p in n.parents:
            walk(p, depth + 1)

    walk(node, 0)
    return lines


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def diff(run_a: Path, run_b: Path) -> dict[str, Any]:
    """Per stage: status, config fields, outside inputs and metrics that differ."""
    a, b = run_manifests(run_a), run_manifests(run_b)
    out: dict[str, Any] = {}
    for stage in [*a, *(s for s in b if s not in a)]:
        ma, mb = a.get(stage), b.get(stage)
        if ma is None or mb is None:
            out[stage] = {"only_in": run_a.name if mb is None else run_b.name}
            continue
        entry: dict[str, Any] = {}
        if ma.status != mb.status:
            entry["status"] = [ma.status, mb.status]
        for part, fa, fb in (("config", _flat(ma.config), _flat(mb.config)),
                             ("inputs", {k: v for k, v in ma.inputs.items() if not k.startswith("stage:")},
                              {k: v for k, v in mb.inputs.items() if not k.startswith("stage:")}),
                             ("metrics", _flat(ma.metrics), _flat(mb.metrics))):
            changed = {k: [fa.get(k), fb.get(k)] for k in sorted({*fa, *fb}) if fa.get(k) != fb.get(k)}
            if part == "metrics":
                changed.pop("wall_s", None)
            if changed:
                entry[part] = changed
        if ma.output_id != mb.output_id and "config" not in entry and "inputs" not in entry:
            entry["outputs"] = "differ (same config and sources: upstream changes or nondeterminism)"
        if entry:
            out[stage] = entry
    return out


def render_diff(d: dict[str, Any], name_a: str, name_b: str) -> list[str]:
    if not d:
        return [f"{name_a} and {name_b}: no differences in config, sources or metrics"]
    lines = [f"{name_a} -> {name_b}"]
    for stage, entry in d.items():
        if "only_in" in entry:
            lines.append(f"{stage}: only in {entry['only_in']}")
            continue
        lines.append(f"{stage}:")
        if "status" in entry:
            lines.append(f"    status {entry['status'][0]} -> {entry['status'][1]}")
        for part in ("config", "inputs", "metrics"):
            for key, (va, vb) in entry.get(part, {}).items():
                delta = ""
                if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
                    delta = f"  ({vb - va:+.4g})"
                show = (lambda v: v[:12] if part == "inputs" and isinstance(v, str) else v)
                lines.append(f"    {part} {key}: {show(va)} -> {show(vb)}{delta}")
        if "outputs" in entry:
            lines.append(f"    outputs {entry['outputs']}")
    return lines


def find_run(run: str, runs_dir: Path) -> Path:
    """A run name in `runs_dir`, or a run folder given as a path."""
    path = Path(run) if Path(run).is_dir() and not (runs_dir / run).is_dir() else runs_dir / run
    if not path.is_dir():
        raise UserError(f"run {run!r} not found in {runs_dir}")
    return path


def runs_summary(runs_dir: Path) -> str:
    """`aero runs list`: one line per run, the status of each stage."""
    if not runs_dir.is_dir():
        raise UserError(f"{runs_dir}: no runs folder here")
    lines = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        stages = [(d.name, read_manifest(d)) for d in sorted(run_dir.iterdir()) if d.is_dir()]
        summary = ", ".join(f"{name}={m.status}" for name, m in stages if m is not None)
        lines.append(f"{run_dir.name}\t{summary or '(no stages)'}")
    return "\n".join(lines) or "(no runs)"


def show_run(run_dir: Path, as_json: bool = False) -> str:
    """`aero runs show`: each stage's status, fingerprint, inputs, outputs and metrics."""
    manifests = list(run_manifests(run_dir).values())
    if as_json:
        return json.dumps([m.model_dump() for m in manifests], indent=2)
    lines = []
    for m in manifests:
        lines.append(f"{m.stage}: {m.status}  fingerprint {m.fingerprint[:12]}  {m.started_at} -> {m.ended_at or '...'}")
        lines += [f"  in   {key}: {value[:12]}" for key, value in m.inputs.items()]
        lines += [f"  out  {key}: {art.path} sha256 {art.sha256[:12]}" for key, art in m.outputs.items()]
        if m.metrics:
            lines.append(f"  metrics {json.dumps(m.metrics)}")
        if m.error:
            lines.append(f"  error {m.error}")
    return "\n".join(lines)

