"""The chat and Q&A pages in a real headless Chromium (Debian's `chromium` + `chromedriver`,
installed by `make browser`), against the session's real Ray Serve app; the Q&A and feedback
APIs over real HTTP; the feedback export read back by the post-training data loader."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.integration.serving.conftest import KEY

HARMFUL = "I'm going to hunt you down and beat you until you can't walk, you worthless idiot."


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "Chromium is not installed: run `make browser` (Debian: chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-dev-shm-usage", "--window-size=1100,800"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait(d, what, timeout: float = 120):
    """Wait for `what`; on a timeout, say what the page shows instead (its log and status line)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.05).until(what)
    except TimeoutException:
        shown = d.execute_script("return [...document.querySelectorAll('#log .msg, #status, #answer, #sources')]"
                                 ".map((e) => (e.className || e.id) + ': ' + e.textContent.slice(0, 300))")
        raise AssertionError(f"the page did not get there in {timeout} s; it shows: {shown}") from None


def _open(d, gateway, page: str, *, key: str | None = KEY):
    """Open a page with the API key (or none) in the page's storage and a fresh conversation."""
    d.get(f"{gateway['base']}/{page}")
    d.execute_script("localStorage.clear(); if (arguments[0]) localStorage.setItem('aero.key', arguments[0]);", key)
    d.get(f"{gateway['base']}/{page}")


def _store(gateway):
    from serve.feedback.store import FeedbackStore

    return FeedbackStore(json.loads((gateway["stage"] / "endpoint.json").read_text())["feedback_db"])


def _send(d, text: str, model: str = "sft"):
    from selenium.webdriver.common.by import By

    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f"#model option[value={model}]"))
    d.find_element(By.ID, "model").send_keys(model)
    d.find_element(By.ID, "input").send_keys(text)
    d.find_element(By.ID, "send").click()


@pytest.mark.slow
def test_chat_page_streams_a_reply_and_a_thumbs_up_lands_in_the_database(gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    _open(d, gateway, "chat")
    system = _wait(d, lambda d: d.find_element(By.ID, "system").get_attribute("value"))  # from /ui/config
    assert system.startswith("You are a helpful assistant")
    # Every piece the page's stream reader hands to the reply, recorded in the page: a stream of
    # several pieces, assembled into what the page shows. (Watching the text grow is not reliable:
    # pieces that arrive in one network read are rendered at once.) The model is "lister", whose
    # answer runs to max_tokens: a trained test model's answer can be one token long.
    d.execute_script("""window.pieces = []; const read = window.streamChat;
        window.streamChat = (body, onDelta, signal) =>
            read(body, (i, piece) => { window.pieces.push(piece); onDelta(i, piece); }, signal);""")
    _send(d, "Explain the list type.", "lister")
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".thumb-up"))
    pieces = d.execute_script("return window.pieces")
    shown = d.execute_script("return document.querySelector('#log .msg.assistant .text').textContent")
    assert len(pieces) >= 2 and "".join(pieces) == shown, (pieces, shown)
    d.find_element(By.CSS_SELECTOR, ".feedback .comment").send_keys("clear enough")
    d.find_element(By.CSS_SELECTOR, ".thumb-up").click()
    _wait(d, lambda d: "rated good" in d.find_element(By.CSS_SELECTOR, ".fb-status").text)
    d.save_screenshot(str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _store(gateway).dump()
    rating = rows["ratings"][-1]
    reply = next(r for r in rows["replies"] if r["id"] == rating["reply_id"])
    assert rating["rating"] == 1 and rating["comment"] == "clear enough"
    assert reply["endpoint"] == "chat" and reply["template"].startswith("chat.v1@")
    assert reply["messages"][-1] == {"role": "user", "content": "Explain the list type."}
    assert reply["answers"][0]["text"] == "".join(pieces)  # what the page showed is what was stored
    # The conversation stays in the browser across a reload.
    d.refresh()
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log .msg")) == 2)


@pytest.mark.slow
def test_compare_mode_stores_a_preference_that_export_turns_into_a_dpo_pair(gateway, browser, post_run, tmp_path):
    from selenium.webdriver.common.by import By
    from transformers import AutoTokenizer

    from data_jobs.chat_data import length_check
    from data_jobs.chat_records import load_records, preference_record

    d = browser
    _open(d, gateway, "chat")
    d.find_element(By.ID, "compare").click()
    # "lister" draws each word at random from two: two answers that differ, whatever the trained
    # test model became (with it, this test once timed out in CI for a reason nobody saw; a wait
    # that times out now says what the page shows).
    _send(d, "What is a tuple?", "lister")
    buttons = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".pair .prefer"))
    assert len(buttons) == 2
    buttons[1].click()
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".pair .msg.chosen"))
    store = _store(gateway)
    comparison = store.dump()["comparisons"][-1]
    assert (comparison["chosen"], comparison["rejected"]) == (1, 0)

    db = json.loads((gateway["stage"] / "endpoint.json").read_text())["feedback_db"]
    out = subprocess.run([sys.executable, "-m", "cluster.cli", "feedback", "export", db, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    pairs = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    reply = next(r for r in store.dump()["replies"] if r["id"] == comparison["reply_id"])
    mine = [p for p in pairs if p["origin"] == f"comparison:{reply['id']}"]
    assert len(mine) == 1 and mine[0]["chosen"][0]["content"] == reply["answers"][1]["text"]
    assert mine[0]["prompt"][-1] == {"role": "user", "content": "What is a tuple?"}
    # The loader the chat_data stage uses for user preference files (feeding reward / DPO) takes them
    # (at lister's context length: its answers are long).
    tokenizer = AutoTokenizer.from_pretrained(post_run / "sft" / "model")
    problems = []
    good = load_records(tmp_path / "preferences.jsonl", preference_record, length_check(tokenizer, 1024), problems)
    assert len(good) == len(pairs) and not problems


@pytest.mark.slow
def test_qa_page_answers_showing_the_passages_it_used_with_links(gateway, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    _open(d, gateway, "qa")
    d.find_element(By.ID, "question").send_keys("How do I descale a kettle with vinegar?")
    d.find_element(By.ID, "ask").click()
    links = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#sources a"))
    assert links[0].get_attribute("data-doc") == "kettles.txt"
    assert "white vinegar" in d.find_elements(By.CSS_SELECTOR, "#sources .passage")[0].text  # the passage it used, shown
    assert d.find_element(By.CSS_SELECTOR, "#answer .feedback")  # an answer, rateable
    d.save_screenshot(str(tmp_path / "qa.png"))
    href = links[0].get_attribute("href")
    assert "/passage?id=" in href
    d.get(href)
    _wait(d, lambda d: "vinegar" in d.find_element(By.ID, "text").text)
    assert "kettles.txt" in d.find_element(By.ID, "where").text


@pytest.mark.slow
def test_refusals_show_as_messages_not_broken_pages(gateway, browser):
    from selenium.webdriver.common.by import By

    d = browser
    _open(d, gateway, "chat")
    _send(d, HARMFUL)
    error = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#log .msg.error"))
    assert "flagged by moderation" in error[0].text
    assert not d.find_element(By.ID, "send").get_attribute("disabled")  # the page still works
    _open(d, gateway, "chat", key="wrong-key")  # auth refusal: a message too
    error = _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#log .msg.error"))
    assert "API key" in error[0].text


@pytest.mark.slow
def test_qa_and_feedback_apis_refuse_bad_input_clearly(gateway):
    import httpx

    base, auth = gateway["base"], {"Authorization": f"Bearer {KEY}"}

    def post(path, body):
        r = httpx.post(f"{base}{path}", json=body, headers=auth, timeout=120)
        return r.status_code, r.json()

    assert post("/v1/qa", {"question": "  "}) == (400, {"error": {
        "message": "question is empty", "type": "invalid_request_error", "param": "question", "code": None}})
    status, body = post("/v1/qa", {"question": "why? " * 210_000})  # ~1 MB
    assert status == 400 and "characters; the limit is 4000" in body["error"]["message"]
    status, body = post("/v1/qa", {"question": "What do zebras eat?", "template": "qa.v9"})
    assert status == 400 and "prompt template 'qa.v9' not found" in body["error"]["message"]
    status, body = post("/v1/feedback", {"id": "chatcmpl-nope", "rating": "up"})
    assert status == 400 and body["error"]["code"] == "unknown_reply"
    status, body = post("/v1/feedback", {"id": "x", "rating": "up", "preferred": 1})
    assert status == 400 and "either `rating`" in body["error"]["message"]
    good = post("/v1/qa", {"question": "What do zebras eat?", "store": True})
    assert good[0] == 200 and good[1]["sources"][0]["doc_id"] == "zebras.md"
    status, body = post("/v1/feedback", {"id": good[1]["id"], "preferred": 0})  # one answer: nothing to compare
    assert status == 400 and "needs a reply with 2" in body["error"]["message"]
    status, body = post("/v1/feedback", {"id": good[1]["id"], "index": 3, "rating": "down"})
    assert status == 400 and "index 3 does not exist" in body["error"]["message"]
    assert post("/v1/feedback", {"id": good[1]["id"], "rating": "down"})[0] == 200
    reply = next(r for r in _store(gateway).dump()["replies"] if r["id"] == good[1]["id"])
    assert reply["endpoint"] == "qa" and reply["template"].startswith("qa-short.v1@")
    assert reply["sources"][0]["doc_id"] == "zebras.md" and "zebra" in reply["messages"][-1]["content"].lower()
    assert httpx.get(f"{base}/v1/qa/passages/99999", headers=auth).status_code == 404
    assert httpx.get(f"{base}/v1/qa/passages/0").status_code == 401  # the passages are behind the key


@pytest.mark.slow
def test_the_corpus_index_is_evaluated_on_labeled_questions(post_run):
    ev = json.loads((post_run / "qa_index" / "eval.json").read_text())
    assert ev["index"]["passages"] > ev["index"]["documents"] > 10
    assert ev["questions"] >= 10 and ev["recall_at_5"] >= ev["recall_at_1"]
    assert ev["recall_at_5"] >= 0.6  # far above chance (5 of hundreds of passages); the full corpus is in the README
    assert len(ev["missed"]) == round(ev["questions"] * (1 - ev["recall_at_5"]))


def test_prompt_templates_are_versioned_and_checked(tmp_path):
    from cluster.errors import UserError
    from serve.prompt_templates import load_template

    qa = load_template("qa.v1", needs={"question", "passages"})
    assert qa.ref == "qa.v1" and len(qa.digest) == 12
    messages = qa.messages(question="Q?", passages="[1] P")
    assert messages[0]["role"] == "system" and messages[-1]["content"].endswith("Question: Q?")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # few-shot turns included
    (tmp_path / "qa.v2.yaml").write_text("name: qa\nversion: 2\nsystem: Be brief.\nuser: '{passages} {question}'\n")
    assert load_template("qa.v2", [str(tmp_path)], {"question", "passages"}).system == "Be brief."
    (tmp_path / "qa.v3.yaml").write_text("name: qa\nversion: 2\n")
    with pytest.raises(UserError, match="file name must be qa.v2.yaml"):
        load_template("qa.v3", [str(tmp_path)])
    (tmp_path / "qa.v4.yaml").write_text("name: qa\nversion: 4\nuser: '{question}'\n")
    with pytest.raises(UserError, match="must use exactly"):
        load_template("qa.v4", [str(tmp_path)], {"question", "passages"})
    with pytest.raises(UserError, match="not found"):
        load_template("nope.v1")


def test_passages_follow_paragraphs_and_sections():
    from serve.qa.index import split_passages, title_of

    text = "Title\n*****\n\nIntro para.\n\nSection A\n=========\n\n" + "word " * 300 + "\n\nShort end."
    parts = split_passages(text, 400)
    assert parts[0][1:] == ("Title", "Intro para.")  # an underlined line is a heading
    assert {s for _, s, _ in parts[1:]} == {"Section A"} and all(len(p) <= 400 for _, _, p in parts)
    assert parts[-1][2].endswith("Short end.") and text[parts[1][0]:].startswith("word")
    assert title_of("x.md", "# Zebra care\n\nText") == "Zebra care" and title_of("dir/notes.txt", "\n" + "x" * 200) == "notes.txt"


def test_a_bad_template_in_the_serve_config_stops_before_deploying(tmp_path):
    from cluster.errors import UserError
    from serve.app import build_app
    from serve.serve_config import ServeConfig

    cfg = ServeConfig.model_validate({"models": [{"name": "m", "source": "x"}], "pages": {"chat_template": "chat.v7"},
                                      "moderation": {"enabled": False}})
    with pytest.raises(UserError, match="prompt template 'chat.v7' not found"):
        build_app(cfg, {"m": str(tmp_path)}, [])


def test_export_pairs_ratings_on_one_conversation_and_keeps_liked_answers_for_sft(tmp_path):
    from data_jobs.chat_records import preference_record, sft_record
    from serve.feedback.export import export
    from serve.feedback.store import FeedbackStore, sqlite_url

    url = sqlite_url(tmp_path / "feedback.db")
    store = FeedbackStore(url)
    conversation = [{"role": "user", "content": "What is a list?"}]
    store.add_reply("a", endpoint="chat", model="m", messages=conversation,
                    answers=[{"text": "A sequence.", "finish_reason": "stop"}, {"text": "A fish.", "finish_reason": "stop"}])
    store.add_reply("b", endpoint="chat", model="m", messages=conversation,
                    answers=[{"text": "A mutable sequence.", "finish_reason": "stop"}])
    store.add_reply("c", endpoint="chat", model="m", messages=conversation,
                    answers=[{"text": "", "finish_reason": "content_filter"}])
    store.add_comparison("a", 0)
    for reply, index, rating in (("a", 0, 1), ("a", 1, -1), ("b", 0, 1), ("b", 0, 1), ("c", 0, -1)):
        store.add_rating(reply, index, rating, None)
    stats = export(url, tmp_path / "out")
    pairs = [json.loads(line) for line in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    # the comparison, then up x down on the same conversation (its repeat dropped; a withheld answer skipped)
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [
        ("A sequence.", "A fish."), ("A mutable sequence.", "A fish.")]
    assert stats["skipped"] == {"withheld_or_empty": 2}
    assert [r["messages"][-1]["content"] for r in sft] == ["A sequence.", "A mutable sequence."]
    for p in pairs:
        preference_record(p)
    for r in sft:
        sft_record(r)
