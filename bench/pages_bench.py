"""The chat page's time from page load to the first streamed token, in a real headless
Chromium, next to the API's own time to first token (the peer: the same request sent with
httpx, no page); plus Q&A retrieval quality of the run's `qa_index` stage and the latency of
`POST /v1/qa`. Runs against a served recipe:

    AERO_API_KEYS=devkey .venv/bin/aero serve configs/tiny-cpu.yaml &     # in another shell
    AERO_API_KEY=devkey .venv/bin/python bench/pages_bench.py [--screenshots docs]

The last line is JSON: `page_first_token_s` (median of --repeats loads; target < 2 s),
`api_first_token_s`, `ratio` = api / page (the share of the page's wait that is the model's
own; higher is better, 1.0 = the page adds nothing), `qa_s`, `recall` (recall@5 of the index).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MESSAGE = "Explain the list type."


def api_first_token(base: str, key: str, model: str, system: str) -> float:
    import httpx

    body = {"model": model, "stream": True, "max_tokens": 64, "temperature": 0.7,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": MESSAGE}]}
    started = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {key}"}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without text")


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1100,800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def page_first_token(d, base: str, key: str, model: str) -> float:
    """From navigation start to the first streamed text on the page (the message is sent as
    soon as the model list has loaded)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d.get(f"{base}/chat")
    d.execute_script("localStorage.clear(); localStorage.setItem('aero.key', arguments[0]);"
                     "localStorage.setItem('aero.model', arguments[1]);", key, model)
    wait = WebDriverWait(d, 120, poll_frequency=0.01)
    started = time.perf_counter()
    d.get(f"{base}/chat")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    d.find_element(By.ID, "input").send_keys(MESSAGE)
    d.find_element(By.ID, "send").click()
    wait.until(lambda d: d.execute_script(
        "const n = document.querySelectorAll('#log .msg.assistant .text'); return n.length && n[0].textContent"))
    took = time.perf_counter() - started
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".thumb-up"))  # let it finish before the next load
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--endpoint", default=str(ROOT / "runs/tiny-cpu/serve/endpoint.json"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--screenshots", help="folder to save chat.png and qa.png into (e.g. docs)")
    args = ap.parse_args()
    import httpx

    endpoint = json.loads(Path(args.endpoint).read_text())
    base, key = endpoint["url"], os.environ.get("AERO_API_KEY", "")
    ui = httpx.get(f"{base}/ui/config", timeout=30).json()
    model = ui["qa"]["model"] if ui["qa"]["enabled"] else endpoint["models"][0]
    api = [api_first_token(base, key, model, ui["chat"]["system"]) for _ in range(args.repeats + 1)][1:]
    d = browser()
    try:
        page_first_token(d, base, key, model)  # warm-up
        page = [page_first_token(d, base, key, model) for _ in range(args.repeats)]
        if args.screenshots:
            d.save_screenshot(str(Path(args.screenshots) / "chat.png"))
        qa_times = []
        for question in ("How do I exit a loop early?", "What does the with statement do?",
                         "How do I catch an exception?"):
            t = time.perf_counter()
            r = httpx.post(f"{base}/v1/qa", json={"question": question}, timeout=120,
                           headers={"Authorization": f"Bearer {key}"})
            r.raise_for_status()
            qa_times.append(time.perf_counter() - t)
        if args.screenshots:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support.ui import WebDriverWait

            d.get(f"{base}/qa")
            d.find_element(By.ID, "question").send_keys("How do I catch an exception?")
            d.find_element(By.ID, "ask").click()
            WebDriverWait(d, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sources a"))
            d.save_screenshot(str(Path(args.screenshots) / "qa.png"))
    finally:
        d.quit()
    index_eval = Path(endpoint["paths"].get("qa:index", "")).parent / "eval.json"
    recall = json.loads(index_eval.read_text()).get("recall_at_5") if index_eval.is_file() else None
    out = {"bench": "pages", "model": model, "page_first_token_s": round(statistics.median(page), 3),
           "page_first_token_max_s": round(max(page), 3), "api_first_token_s": round(statistics.median(api), 3),
           "ratio": round(statistics.median(api) / statistics.median(page), 3),
           "qa_s": round(statistics.median(qa_times), 3), "recall": recall, "repeats": args.repeats}
    print(f"page load -> first token: median {out['page_first_token_s']} s (max {out['page_first_token_max_s']} s); "
          f"API alone {out['api_first_token_s']} s; POST /v1/qa {out['qa_s']} s; recall@5 {recall}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
