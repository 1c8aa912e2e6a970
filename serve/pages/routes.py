"""The web pages: `/chat`, `/qa` and `/passage` (plain HTML + JS shipped in this folder, no
CDN, so they work offline), and `/ui/config`, what the pages need to start (whether a key
is needed, the chat template's system prompt, whether Q&A and feedback are on).

The pages are open; everything they fetch goes through the API with the key the user typed
(kept in the browser's localStorage), exactly like any other client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from serve.api_app import app
from serve.openai_api import APIError

PAGES = Path(__file__).parent
_ASSETS = {"common.js": "text/javascript", "style.css": "text/css"}


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((PAGES / name).read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


class PageRoutes:
    """Route group of the gateway (reads its config)."""

    def _pages_on(self) -> None:
        if not self.cfg.pages.enabled:
            raise APIError(404, "the web pages are off on this server (serve.pages.enabled: false)")

    @app.get("/", include_in_schema=False)
    async def root_page(self, request: Request):
        self._pages_on()
        return RedirectResponse(f"{request.scope.get('root_path', '').rstrip('/')}/chat")

    @app.get("/chat", include_in_schema=False)
    async def chat_page(self):
        self._pages_on()
        return _page("chat.html")

    @app.get("/qa", include_in_schema=False)
    async def qa_page(self):
        self._pages_on()
        return _page("qa.html")

    @app.get("/passage", include_in_schema=False)
    async def passage_page(self):
        self._pages_on()
        return _page("passage.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_asset(self, name: str):
        self._pages_on()
        if name not in _ASSETS:
            raise APIError(404, f"no asset {name!r}")
        return Response((PAGES / name).read_bytes(), media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})

    @app.get("/ui/config", include_in_schema=False)
    async def ui_config(self) -> dict[str, Any]:
        self._pages_on()
        chat = self.chat_template
        return {"auth": self.cfg.auth.enabled, "feedback": self.feedback is not None,
                "chat": {"template": f"{chat.ref}@{chat.digest}", "system": chat.system},
                "qa": {"enabled": self.retriever is not None, "model": self.cfg.qa_model,
                       "template": f"{self.qa_template.ref}@{self.qa_template.digest}" if self.qa_template else None}}
