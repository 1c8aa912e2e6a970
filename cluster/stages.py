"""The tables of stages and of the `aero` commands that belong to a stage, by name, as
import strings.

`cluster/` never imports a stage's package: the runner and the CLI resolve a name here when
they need it, so the import direction stays stage -> cluster. To add a stage, write a module
exposing `STAGE = cluster.stage.Stage(...)` and add one line below; a stage's own command is
a public function of its package, listed in COMMAND_TABLE.
"""

from __future__ import annotations

import importlib
from typing import Callable

from cluster.errors import UserError
from cluster.stage import Stage

STAGE_TABLE: dict[str, str] = {
    "data": "data_jobs.corpus_stage:STAGE",
    "tokenizer": "data_jobs.tokenizer_stage:STAGE",
    "pretrain": "jobs.pretrain:STAGE",
    "chat_data": "data_jobs.chat_data:STAGE",
    "sft": "jobs.posttrain:SFT",
    "reward": "jobs.posttrain:REWARD",
    "judge": "jobs.posttrain:JUDGE",
    "dpo": "jobs.posttrain:DPO",
    "grpo": "jobs.posttrain:GRPO",
    "eval": "jobs.evaluate:STAGE",
    "sparsify": "jobs.sparsify:STAGE",
    "quantize": "jobs.quantize:STAGE",
    "moderation": "serve.moderation.stage:STAGE",
    "qa_index": "serve.qa.stage:STAGE",
    "serve": "serve.app:STAGE",
    "generate": "serve.generate.stage:STAGE",
    "tune": "tune.search:STAGE",
}


def load_stage(name: str) -> Stage:
    if name not in STAGE_TABLE:
        raise UserError(f"unknown stage {name!r} (known: {', '.join(STAGE_TABLE)})")
    stage = _resolve(STAGE_TABLE[name])
    if not isinstance(stage, Stage) or stage.name != name:
        raise TypeError(f"{STAGE_TABLE[name]} is not the Stage named {name!r}")
    return stage


COMMAND_TABLE: dict[str, str] = {
    "quantize": "jobs.quantize:quantize_model",
    "generate": "serve.generate.stage:generate_one_off",
    "serve.status": "serve.app:status",
    "serve.shutdown": "serve.app:shutdown",
    "moderation.report": "serve.moderation.audit:report_for",
    "feedback.export": "serve.feedback.export:export_from",
}


def load_command(name: str) -> Callable[..., str]:
    """The public function behind a stage's `aero` command; it returns what the command prints."""
    return _resolve(COMMAND_TABLE[name])


def _resolve(spec: str):
    module_name, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module_name), attr)
