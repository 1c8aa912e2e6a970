"""What the eval stage measures in generated text, on hand-made answers: loops and repeats,
distinct-n, the independent judge, and the reward-hacking guard's warnings; and the run
report showing a stage's warnings."""

from __future__ import annotations

import pytest

from jobs.evaluate import hacking_warnings, reward_trend
from jobs.text_quality import degenerate, degeneration, distinct_n, ends_in_loop, judge, repeated_ngram_share

LOOP = 'The "return" statement\nThe "return" statement\nThe "return" statement\nThe "return" statement'
FLUENT = "A for loop runs its body once for each item of a sequence, in order, then stops."


@pytest.mark.parametrize("text,loops", [
    (LOOP, True),
    (FLUENT, False),
    ("see also see also see also see", True),  # cut mid-phrase by the token limit
    ("yes yes", False),  # too short to call a loop
    ("The list, the set and the dict are the containers the tutorial covers.", False),
])
def test_a_loop_at_the_end_is_found_and_fluent_text_is_not(text, loops):
    assert ends_in_loop(text) is loops


def test_repeats_and_distinct_n_measure_degeneration():
    assert repeated_ngram_share(FLUENT) == 0 and repeated_ngram_share(LOOP) > 0.5
    assert distinct_n([FLUENT], 2) == 1.0 and distinct_n([LOOP], 2) < 0.5 and distinct_n([""], 1) == 0.0
    assert degenerate(LOOP) and not degenerate(FLUENT)
    d = degeneration([FLUENT, LOOP])
    assert d["loop_share"] == 0.5 and 0 < d["distinct_1"] < 1 and d["repeated_4gram_share"] > 0.3


def test_the_judge_scores_an_answer_near_its_reference_above_an_unrelated_one():
    ref = ["The for statement iterates over the items of any sequence, in the order they appear."]
    near = judge(["The for statement iterates over the items of a sequence in order."], ref)
    far = judge([LOOP], ref)
    assert near["rouge_l"] > far["rouge_l"] and near["chrf"] > far["chrf"]
    assert judge([], []) == {"rouge_l": 0.0, "chrf": 0.0}


def test_a_policy_that_reads_worse_than_the_baseline_is_warned_about_and_a_rising_reward_is_named():
    good = {"rouge_l": 0.3, "chrf": 30.0, "distinct_2": 0.8, "loop_share": 0.0}
    looping = {"rouge_l": 0.1, "chrf": 12.0, "distinct_2": 0.3, "loop_share": 0.5}
    quality = {"pretrain": looping, "sft": good, "dpo": dict(good), "grpo": looping}
    trends = {"grpo": reward_trend([{"step": s, "reward": r} for s, r in enumerate([0.1, 0.2, 0.9, 1.4])], "reward"),
              "dpo": None}
    warnings = hacking_warnings(quality, ["pretrain", "sft", "dpo", "grpo"], "sft", trends)
    assert len(warnings) == 1 and warnings[0].startswith("grpo: its training reward rose 0.100 -> 1.400")
    assert "rouge_l 0.100 < 0.300" in warnings[0] and "loop_share 0.500 > 0.000" in warnings[0]
    assert hacking_warnings(quality, ["grpo", "sft"], "sft", {}) == []  # only models after the baseline
    assert reward_trend([{"step": 1}], "reward") is None


def test_the_run_report_shows_a_stages_warnings(tmp_path):
    from cluster.manifest import Manifest, utc_now, write_manifest
    from cluster.report import build_report

    run = tmp_path / "r"
    write_manifest(run / "eval", Manifest(stage="eval", run="r", status="finished", fingerprint="f", config={},
                                          metrics={"warnings": ["grpo: its answers read worse than sft's"]},
                                          started_at=utc_now()))
    page = build_report(run).read_text()
    assert "<h2 class=bad>Warnings</h2>" in page and "<strong>Warning:</strong> grpo: its answers read worse" in page
