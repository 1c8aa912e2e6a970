"""Lineage, run comparison and the run report, read from the trained chain's real manifests."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser

import pytest

from tests.conftest import aero


@pytest.mark.slow
def test_lineage_goes_from_the_evaluated_models_back_to_the_corpus_sources(post_run):
    shown = aero("runs", "show", "post", f"--runs-dir={post_run.parent}", "--lineage", "--stage", "eval")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("eval: finished")
    for stage in ("grpo", "sft", "reward", "pretrain", "chat_data", "tokenizer", "data"):
        assert any(line.lstrip().startswith(f"<- {stage}: finished") for line in lines), stage
    assert any("source source:stdlib:docs: sha256" in line for line in lines)
    as_json = json.loads(aero("runs", "show", "post", f"--runs-dir={post_run.parent}", "--lineage", "--json",
                              "--stage", "sft").stdout)
    parents = {p["stage"]: p for p in as_json["parents"]}
    assert set(parents) == {"chat_data", "pretrain"} and not parents["pretrain"]["stale"]
    assert as_json["config"]["base"] == "pretrain" and as_json["outputs"]["model"]["sha256"]
    missing = aero("runs", "show", "post", f"--runs-dir={post_run.parent}", "--lineage", "--stage", "nope")
    assert missing.returncode != 0 and "has no stage 'nope'" in missing.stderr


@pytest.mark.slow
def test_runs_diff_names_what_changed_and_a_rerun_upstream_is_stale(post_run, tmp_path):
    from cluster.manifest import read_manifest, write_manifest

    for run in ("a", "b"):
        for stage in ("data", "tokenizer", "pretrain"):
            (tmp_path / run / stage).mkdir(parents=True)
            shutil.copy(post_run / stage / "manifest.json", tmp_path / run / stage / "manifest.json")
    pre = read_manifest(tmp_path / "b" / "pretrain")
    pre.config["lr"] = pre.config["lr"] * 2
    pre.metrics["val_loss"] = pre.metrics["val_loss"] + 0.5
    write_manifest(tmp_path / "b" / "pretrain", pre)
    tok = read_manifest(tmp_path / "b" / "tokenizer")
    tok.fingerprint = "0" * 64  # as if the tokenizer had been rerun after pretrain read it
    write_manifest(tmp_path / "b" / "tokenizer", tok)
    out = aero("runs", "diff", "a", "b", f"--runs-dir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert "config lr:" in out.stdout and "metrics val_loss:" in out.stdout and "(+0.5)" in out.stdout
    assert "data:" not in out.stdout  # unchanged stages are not listed
    assert "no differences" in aero("runs", "diff", "a", "a", f"--runs-dir={tmp_path}").stdout
    chain = aero("runs", "show", "b", f"--runs-dir={tmp_path}", "--lineage").stdout
    assert "<- tokenizer: finished" in chain and "STALE" in chain.split("<- tokenizer")[1].splitlines()[0]


@pytest.mark.slow
def test_the_run_report_is_one_offline_page_with_pictures_tables_and_lineage(post_run):
    out = aero("runs", "report", "post", f"--runs-dir={post_run.parent}")
    assert out.returncode == 0, out.stderr
    page = (post_run / "report.html").read_text()

    class Collect(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.sources = [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append(tag)
            self.sources += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith(("#", "data:"))]

    c = Collect()
    c.feed(page)
    assert c.tags.count("img") >= 4 and page.count("data:image/png;base64,") == c.tags.count("img")  # funnel, curves
    assert not [s for s in c.sources if s.startswith("http") and "127.0.0.1" not in s]  # nothing fetched from the net
    for stage in ("data", "pretrain", "sft", "eval", "quantize", "moderation", "qa_index"):
        assert f"id='{stage}'" in page, stage
    assert "<table>" in page and "awq" in page.lower() and "Lineage" in page and "reward" in page


@pytest.mark.slow
def test_a_second_pipeline_run_skips_every_finished_stage(post_run):
    from cluster.manifest import read_manifest
    from cluster.runner import run_pipeline
    from tests.conftest import CHAIN, recipe

    before = {stage: read_manifest(post_run / stage).started_at for stage in CHAIN}
    said = []
    manifests = run_pipeline(recipe(post_run.parent), echo=said.append)
    assert [m.stage for m in manifests] == CHAIN and all(m.status == "finished" for m in manifests)
    assert sum(line.endswith("skipped") for line in said) == len(CHAIN), said
    assert {stage: read_manifest(post_run / stage).started_at for stage in CHAIN} == before

