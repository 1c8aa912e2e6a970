"""`runs/<run>/report.html`: one self-contained page per run (pictures embedded, no network),
made from what the stages wrote: each stage's status, wall time and metrics, its pictures
(`*.png` in its folder: data funnel, loss curves, ...) and tables (`*.md`: eval, quantization,
sparsity, moderation), the lineage chain, and the benchmark figures in `bench/results/`.

It reads files only (no stage imports), so any stage that writes a picture or a markdown
table into its folder shows up without changes here. Markdown is rendered by markdown-it-py.
"""

from __future__ import annotations

import base64
import html
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cluster.lineage import config_hash, lineage, render, run_manifests
from cluster.manifest import atomic_write_text

STYLE = """body{font-family:system-ui,sans-serif;max-width:70rem;margin:1.5rem auto;padding:0 1rem;color:#1d2330}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #d5d9e0;padding:.25rem .5rem;text-align:left;
font-size:.9rem}th{background:#eef1f6}img{max-width:100%;border:1px solid #d5d9e0;margin:.4rem 0}
.ok{color:#17753a}.bad{color:#a3261b}pre{background:#f4f6f9;padding:.6rem;overflow:auto;font-size:.8rem}
section{border-top:2px solid #e3e7ee;margin-top:1.4rem}"""


def _md(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _scalar_metrics(metrics: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for k, v in metrics.items():
        if isinstance(v, (int, float, str, bool)) or v is None:
            out.append((k, round(v, 4) if isinstance(v, float) else v))
        elif isinstance(v, dict) and all(isinstance(x, (int, float, str)) for x in v.values()):
            out.append((k, ", ".join(f"{a}: {b}" for a, b in v.items())))
    return out


def _bench_rows(results: Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(results.glob("*")):
        try:
            text = path.read_text(encoding="utf-8").strip()
            data = json.loads(text) if path.suffix == ".json" else json.loads(text.splitlines()[-1])
        except (OSError, ValueError, IndexError):
            continue
        data = data.get("summary", data) if isinstance(data, dict) else None
        if isinstance(data, dict):
            rows.append({"file": path.name, **{k: v for k, v in data.items() if isinstance(v, (int, float, str))}})
    return rows


def build_report(run_dir: Path, bench_results: Path | None = None) -> Path:
    manifests = run_manifests(run_dir)
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>AeroLLMs run {html.escape(run_dir.name)}"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>Run <code>{html.escape(run_dir.name)}</code></h1>",
             f"<p>Report made {datetime.now(timezone.utc).isoformat(timespec='seconds')} from {html.escape(str(run_dir))}."]
    any_m = next(iter(manifests.values()), None)
    if any_m is not None:
        versions = ", ".join(f"{k} {v}" for k, v in any_m.versions.items() if v)
        parts.append(f" Code {html.escape(any_m.git_commit or 'unknown')[:12]}; {html.escape(versions)}.</p>")
    parts.append("<h2>Stages</h2><table><tr><th>stage</th><th>status</th><th>wall s</th><th>config</th>"
                 "<th>metrics</th></tr>")
    for name, m in manifests.items():
        cls = "ok" if m.status == "finished" else "bad"
        metrics = "; ".join(f"{k}: {v}" for k, v in _scalar_metrics(m.metrics) if k != "wall_s")
        parts.append(f"<tr><td><a href='#{name}'>{name}</a></td><td class={cls}>{m.status}</td>"
                     f"<td>{m.metrics.get('wall_s', '')}</td><td><code>{config_hash(m)}</code></td>"
                     f"<td>{html.escape(metrics)[:400]}</td></tr>")
    parts.append("</table>")
    warned = [(name, w) for name, m in manifests.items() for w in m.metrics.get("warnings") or []]
    if warned:  # e.g. the eval stage's reward-hacking guard
        parts.append("<h2 class=bad>Warnings</h2><ul class=bad>" + "".join(
            f"<li><a href='#{name}'>{name}</a>: {html.escape(str(w))}</li>" for name, w in warned) + "</ul>")
    for name, m in manifests.items():
        folder = run_dir / name
        parts.append(f"<section id='{name}'><h2>{name}</h2>")
        if m.error:
            parts.append(f"<pre class=bad>{html.escape(m.error)}</pre>")
        for w in m.metrics.get("warnings") or []:
            parts.append(f"<p class=bad><strong>Warning:</strong> {html.escape(str(w))}</p>")
        for png in sorted(folder.glob("*.png")):
            data = base64.b64encode(png.read_bytes()).decode()
            parts.append(f"<figure><img alt='{png.name}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{png.name}</figcaption></figure>")
        for md in sorted(folder.glob("*.md")):
            parts.append(_md(md.read_text(encoding="utf-8")))
        endpoint = folder / "endpoint.json"
        if endpoint.is_file():
            e = json.loads(endpoint.read_text())
            links = [f"OpenAI base URL <code>{html.escape(e.get('openai_base_url', ''))}</code>"]
            for page, url in (e.get("pages") or {}).items():
                links.append(f"{page} page <a href='{html.escape(url)}'>{html.escape(url)}</a>")
            parts.append("<p>" + "; ".join(links) + "</p>")
        parts.append("</section>")
    if manifests:
        parts.append("<section><h2>Lineage</h2><pre>" + html.escape("\n".join(render(lineage(run_dir)))) + "</pre></section>")
    rows = _bench_rows(bench_results) if bench_results and bench_results.is_dir() else []
    if rows:
        parts.append("<section><h2>Benchmarks</h2><p>Last figures of each script in "
                     f"<code>{html.escape(str(bench_results))}</code> (how each is measured: docs/benchmarks.md).</p>")
        for row in rows:
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(k))}</th>" for k in row) + "</tr><tr>"
                         + "".join(f"<td>{html.escape(str(v))}</td>" for v in row.values()) + "</tr></table>")
        parts.append("</section>")
    parts.append("</body></html>")
    out = run_dir / "report.html"
    atomic_write_text(out, "\n".join(parts) + "\n")
    return out
