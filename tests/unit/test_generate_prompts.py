"""Batch generation's input and prompts, without Ray: malformed lines and missing template
fields become rejects with their reason; Jinja and project templates render per row."""

from __future__ import annotations

import json

import pytest

from cluster.errors import ConfigError, UserError
from serve.generate.generate_config import GenerateConfig
from serve.generate.prompt_rows import ID, PromptRenderer, plain_prompt, read_jsonl_rows
from serve.generate.stage import load_rows, pick, written_ids, write_shard


def test_malformed_lines_are_rejects_named_by_line_and_good_lines_keep_their_position(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": \n[1, 2]\n{"text": "b"}\n')
    rows, rejects = read_jsonl_rows(f)
    assert [(r[ID], r["text"]) for r in rows] == [("line-1", "a"), ("line-5", "b")]
    assert [r[ID] for r in rejects] == ["line-3", "line-4"]
    assert "rows.jsonl:3: not a JSON line" in rejects[0]["reason"] and "not a JSON object" in rejects[1]["reason"]


def test_jinja_templates_render_rows_with_examples_and_name_a_missing_field(tmp_path):
    tpl = tmp_path / "q.j2"
    tpl.write_text("{% for e in examples %}{{ e.text }} -> {{ e.question }}\n{% endfor %}Passage: {{ text }}\nQ:")
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"text": "x", "question": "y?"}) + "\n")
    r = PromptRenderer(str(tpl), [], str(shots))
    assert r.messages({"text": "Lists hold items.", ID: "1"}) == [
        {"role": "user", "content": "x -> y?\nPassage: Lists hold items.\nQ:"}]
    with pytest.raises(ValueError, match="template field missing: 'text' is undefined"):
        r.messages({"title": "no text here"})
    bad = tmp_path / "bad.j2"
    bad.write_text("{% for %}")
    with pytest.raises(UserError, match="bad.j2:1"):
        PromptRenderer(str(bad), [])
    with pytest.raises(UserError, match="does not exist"):
        PromptRenderer(str(tmp_path / "none.j2"), [])


def test_project_templates_give_chat_messages_and_plain_prompts_join_them():
    r = PromptRenderer("qa.v1", [])
    messages = r.messages({"question": "What is a list?", "passages": "[1] Lists: ordered."})
    assert messages[0]["role"] == "system" and "What is a list?" in messages[-1]["content"]
    with pytest.raises(ValueError, match="template field missing: passages"):
        r.messages({"question": "q"})
    assert plain_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]) == "S\n\nU"


def test_ids_samples_and_the_written_shards(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"id": f"d{i}", "text": str(i)}) + "\n" for i in range(10)))
    cfg = GenerateConfig(input=str(f), template="x.j2", model="sft", id_field="id", sample=3)
    rows, _ = load_rows(None, cfg)
    assert [r[ID] for r in rows][:2] == ["d0", "d1"]
    sampled = pick(rows, cfg)
    assert len(sampled) == 3 and sampled == pick(rows, cfg)  # seeded
    assert [r[ID] for r in pick(rows, cfg.model_copy(update={"sample": None, "max_rows": 2}))] == ["d0", "d1"]
    f.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(UserError, match="repeats"):
        load_rows(None, cfg)
    write_shard(tmp_path / "out", [{ID: "x", "generated_text": "t"}])
    (tmp_path / "out" / "part-broken.parquet").write_text("not parquet")
    assert written_ids(tmp_path / "out") == {"x"} and not (tmp_path / "out" / "part-broken.parquet").exists()


def test_bad_generate_configs_are_refused(tmp_path):
    from tests.conftest import recipe

    for section, message in [({"template": "t.j2"}, "exactly one of `model`"),
                             ({"template": "t.j2", "model": "sft", "upstream": "http://x/v1"}, "exactly one"),
                             ({"template": "t.j2", "upstream": "ftp://x"}, "http"),
                             ({"template": "t.j2", "model": "sft", "max_rows": 2, "sample": 2}, "not both"),
                             ({"model": "sft"}, "template: required"),
                             ({"template": "t.j2", "model": "sft", "cpu_threads": "all; rm -rf"}, "cpu_threads"),
                             ({"template": "t.j2", "model": "sft", "sampling": {"max_tokens": 8, "min_tokens": 9}},
                              "min_tokens \\(9\\) is over max_tokens \\(8\\)")]:
        with pytest.raises(ConfigError, match=message):
            recipe(tmp_path, generate=section)


def test_eval_and_generate_share_the_batch_engine_settings(tmp_path):
    from tests.conftest import recipe

    r = recipe(tmp_path, eval={"vllm": {"gpus": 1, "batch_size": 64, "cpu_threads": "0-3"}},
               generate={"template": "t.j2", "model": "sft", "gpus": 1, "batch_size": 64, "cpu_threads": "0-3"})
    engine = r.stage_config("eval").vllm
    assert engine is not None and engine.model_dump() == {
        k: v for k, v in r.stage_config("generate").model_dump().items() if k in type(engine).model_fields}
    with pytest.raises(ConfigError, match="eval.vllm.kv_cache_gib"):
        recipe(tmp_path, eval={"vllm": {"kv_cache_gib": 0}})
