"""The import rules of docs/architecture.md, read from the source with `ast`: packages import
only in the allowed direction (nothing imports `serve` or `tune`; `cluster` imports no stage),
no module imports another package's private (`_name`) names, and `cluster/` has no import
circle, counting imports inside functions too."""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "cluster": set(),
    "data_jobs": {"cluster"},
    "jobs": {"cluster"},
    "serve": {"cluster", "jobs", "data_jobs"},  # jobs: model loading, memory estimates, the batch engine; data_jobs: record checks, PII patterns
    "tune": {"cluster", "jobs"},
}
CHECKED = [*ALLOWED, "bench", "tests"]


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, imported names) for every import statement, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names]
    return found


@functools.cache
def _parsed_in_fresh_interpreter(paths: tuple[str, ...]) -> dict[str, list]:
    """parse_imports of each file, run in a new Python: CPython 3.11.7's ast.parse can fail
    spuriously ("AST constructor recursion depth mismatch", fixed in 3.11.8) late in a process
    whose imports changed the interpreter's recursion limit, as the integration tests' do."""
    script = ("import json, sys; from pathlib import Path; from tests.unit.test_imports import parse_imports; "
              "print(json.dumps({p: parse_imports(Path(p)) for p in sys.argv[1:]}))")
    done = subprocess.run([sys.executable, "-c", script, *paths], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(done.stdout)


def _imports(path: Path) -> list[list]:
    """A checked file's imports, from one fresh-interpreter parse of every checked file."""
    return _parsed_in_fresh_interpreter(tuple(str(p) for p in _all_files()))[str(path)]


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@functools.cache
def _all_files() -> tuple[Path, ...]:
    return tuple(p for package in CHECKED for p in _files(package))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_in_the_allowed_direction(package):
    wrong = [f"{path.relative_to(REPO)}:{line} imports {module}"
             for path in _files(package) for line, module, _ in _imports(path)
             if (top := module.split(".")[0]) in ALLOWED and top != package and top not in ALLOWED[package]]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_packages_private_names():
    wrong = []
    for package in CHECKED:
        for path in _files(package):
            for line, module, names in _imports(path):
                top = module.split(".")[0]
                if top in ALLOWED and top != package:
                    private = [n for n in [*module.split(".")[1:], *names] if n.startswith("_") and n != "__future__"]
                    if private:
                        wrong.append(f"{path.relative_to(REPO)}:{line} imports {module}: {', '.join(private)}")
    assert not wrong, "\n".join(wrong)


def test_cluster_modules_form_no_import_circle():
    graph = {_module(p): {m for _, m, _ in _imports(p) if m.startswith("cluster.")} for p in _files("cluster")}

    def circle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*path, start]
                if nxt not in path:
                    stack.append((nxt, [*path, nxt]))
        return None

    circles = [c for m in graph if (c := circle_from(m))]
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)


def test_the_rules_catch_a_backward_import(tmp_path):
    """The checker itself: a file that imports upward is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from serve.app import _inputs\n")
    assert _parsed_in_fresh_interpreter((str(bad),))[str(bad)] == [[2, "serve.app", ["_inputs"]]]
