"""Versioned prompt templates: system prompts, the Q&A template and few-shot examples as YAML
files named `<name>.v<version>.yaml` (shipped in `serve/prompts/`, or in the recipe's
`serve.prompt_dirs`). The serve config selects them by reference (`qa.v1`), and every stored
answer records the reference and the file's digest, so answers (and feedback) made with two
versions of a prompt can be told apart and compared.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

import yaml
from pydantic import Field, ValidationError

from cluster.config import StrictModel
from cluster.errors import UserError

SHIPPED = Path(__file__).with_name("prompts")


class FewShot(StrictModel):
    user: str
    assistant: str


class PromptTemplate(StrictModel):
    name: str = Field(pattern=r"^[a-z0-9_-]+$")
    version: int = Field(ge=1)
    description: str = ""
    system: str = ""
    user: str = "{question}"
    few_shot: list[FewShot] = Field(default_factory=list)
    digest: str = ""  # sha256 prefix of the file: set when loaded

    @property
    def ref(self) -> str:
        return f"{self.name}.v{self.version}"

    def fields(self) -> set[str]:
        return {f for _, f, _, _ in string.Formatter().parse(self.user) if f}

    def messages(self, system: str | None = None, few_shot: bool = True, **values: str) -> list[dict[str, str]]:
        """system (the template's, unless given), few-shot turns, then the filled user turn."""
        out = [{"role": "system", "content": self.system if system is None else system}]
        out = out if out[0]["content"] else []
        for shot in self.few_shot if few_shot else []:
            out += [{"role": "user", "content": shot.user}, {"role": "assistant", "content": shot.assistant}]
        return out + [{"role": "user", "content": self.user.format(**values)}]


def load_template(ref: str, dirs: list[str] = (), needs: set[str] | None = frozenset({"question"})) -> PromptTemplate:
    """The template `ref` (`name.vN`) from the first of `dirs` (then the shipped folder) that has it;
    its user text must use exactly the fields `needs` (None: any)."""
    for folder in [*map(Path, dirs), SHIPPED]:
        path = folder.expanduser() / f"{ref}.yaml"
        if path.is_file():
            break
    else:
        known = sorted({p.stem for d in [*map(Path, dirs), SHIPPED] for p in d.expanduser().glob("*.v*.yaml")})
        raise UserError(f"prompt template {ref!r} not found (known: {', '.join(known)})")
    raw = path.read_bytes()
    try:
        data = yaml.safe_load(raw)
        tpl = PromptTemplate.model_validate({**(data or {}), "digest": hashlib.sha256(raw).hexdigest()[:12]})
    except (yaml.YAMLError, ValidationError) as e:
        raise UserError(f"prompt template {path}: {e}") from None
    if tpl.ref != ref:
        raise UserError(f"prompt template {path} says name {tpl.name!r} version {tpl.version}; its file name must be "
                        f"{tpl.ref}.yaml")
    if needs is not None and tpl.fields() != set(needs):
        raise UserError(f"prompt template {path}: its user text uses {{{', '.join(sorted(tpl.fields()))}}}; "
                        f"it must use exactly {{{', '.join(sorted(needs))}}}")
    return tpl
