"""A batch job's rows and prompts: reading the input (malformed lines become rejects, not a
failed run), and rendering one prompt per row from a Jinja file or a project prompt template.

Jinja runs sandboxed with undefined fields as errors, so a row that lacks a field the template
uses is rejected with the field's name instead of generating from a half-empty prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cluster.errors import UserError

ID = "__id__"  # the row id column: the input's own ids, or the row's position


def read_jsonl_rows(path: Path) -> tuple[list[dict], list[dict]]:
    """(rows, rejects): every non-blank line a JSON object, else a reject naming the line."""
    rows, rejects = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            rejects.append({ID: f"line-{n}", "reason": f"{path.name}:{n}: not a JSON line ({exc})", "row": line[:2000]})
            continue
        if not isinstance(row, dict):
            rejects.append({ID: f"line-{n}", "reason": f"{path.name}:{n}: not a JSON object", "row": line[:2000]})
            continue
        rows.append({**row, ID: f"line-{n}"})
    return rows, rejects


class PromptRenderer:
    """Row -> chat messages (a project template: system, few-shot turns, user) or -> one user
    text (a Jinja file, with `examples` from the few-shot file)."""

    def __init__(self, template: str, prompt_dirs: list[str], few_shot: str | None = None):
        self.ref = template
        self.jinja = None
        self.tpl = None
        if template.endswith((".j2", ".jinja", ".jinja2")):
            from jinja2 import StrictUndefined, TemplateSyntaxError
            from jinja2.sandbox import SandboxedEnvironment

            path = Path(template).expanduser()
            if not path.is_file():
                raise UserError(f"generate.template: {path} does not exist")
            env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False)
            try:
                self.jinja = env.from_string(path.read_text(encoding="utf-8"))
            except TemplateSyntaxError as exc:
                raise UserError(f"generate.template: {path}:{exc.lineno}: {exc.message}") from None
            self.examples = self._examples(few_shot)
        else:
            from serve.prompt_templates import load_template

            if few_shot:
                raise UserError("generate.few_shot is for Jinja templates; a project template carries its own few_shot")
            self.tpl = load_template(template, prompt_dirs, needs=None)

    @staticmethod
    def _examples(path: str | None) -> list[dict]:
        if not path:
            return []
        from cluster.records import jsonl_objects

        return [row for _, row in jsonl_objects(Path(path).expanduser())]

    def messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        """The prompt for one row; raises ValueError naming what is missing."""
        fields = {k: v for k, v in row.items() if k != ID}
        if self.jinja is not None:
            from jinja2 import UndefinedError

            try:
                text = self.jinja.render(**fields, examples=self.examples).strip()
            except UndefinedError as exc:
                raise ValueError(f"template field missing: {exc.message}") from None
            if not text:
                raise ValueError("the template rendered an empty prompt")
            return [{"role": "user", "content": text}]
        missing = sorted(self.tpl.fields() - set(fields))
        if missing:
            raise ValueError(f"template field missing: {', '.join(missing)}")
        return self.tpl.messages(**{k: str(fields[k]) for k in self.tpl.fields()})


def plain_prompt(messages: list[dict[str, str]]) -> str:
    """The prompt for a model without a chat template: the turns' text, blank-line separated."""
    return "\n\n".join(m["content"] for m in messages if m["content"])
