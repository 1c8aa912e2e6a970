"""The one FastAPI app behind the gateway, with OpenAI-shaped error handlers.

It lives apart from `gateway.py` so that the route groups in other modules (Q&A, feedback,
pages) register on the same app; `@serve.ingress` binds every route whose method is on the
`Gateway` class or one of its bases.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from serve.openai_api import APIError

app = FastAPI(title="AeroLLMs gateway", version="1")


@app.exception_handler(APIError)
async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", []) if p != "body"]
    message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message, param = f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})", None
    return JSONResponse(APIError(400, message, param=param).body(), status_code=400)
