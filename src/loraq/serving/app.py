"""The HTTP face of a server: FastAPI routes over a :class:`~loraq.serving.server.Served` model.

``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models`` (OpenAI's), ``POST
/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (vLLM's names; the admin key only), ``GET /health``
(503 while the model loads), ``GET /metrics`` (Prometheus), ``GET /`` (the playground page). Every error is
OpenAI's shape with its status: a client's mistake is a 4xx, never a 5xx (OpenAI's clients retry those).
With an API key, every ``/v1`` route wants ``Authorization: Bearer <key>`` (401 otherwise).
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from loraq.serving.protocol import ApiError

PLAYGROUND = Path(__file__).with_name("playground.html")


def build_app(server):
    """The FastAPI app of ``server`` (a :class:`loraq.serving.server.Server`)."""
    app = FastAPI(title="loraq serve", docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    @app.get("/health")
    async def health():
        if server.served is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/v1/models")
    async def models(request: Request):
        served = _ready(server, request)
        return {"object": "list", "data": served.model_cards()}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(server, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(server, request, "completion")

    _add_adapter_routes(app, server)
    return app


def _add_error_handlers(app) -> None:
    """Every error in OpenAI's shape: ours, routing's (404, 405), a body that fails validation, a bug (500)."""
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        error = ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").body(),
                            status_code=500)


def _add_adapter_routes(app, server) -> None:
    """vLLM's runtime adapter routes, for the admin key only."""
    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        served = _ready(server, request, admin=True)
        body = await _body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "lora_name and lora_path (a folder on the server) are required", param="lora_name")
        await asyncio.to_thread(served.load_adapter, name, path)
        return {"status": "ok", "lora_name": name}

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request):
        served = _ready(server, request, admin=True)
        body = await _body(request)
        served.unload_adapter(body.get("lora_name"))
        return {"status": "ok", "lora_name": body.get("lora_name")}


def _ready(server, request, admin: bool = False):
    """The served model, after the key check; 503 while it loads."""
    if admin and server.admin_key is None:
        raise ApiError(403, "loading adapters at runtime needs an admin key: start the server with --admin-key",
                       kind="permission_error", code="no_admin_key")
    keys = {server.admin_key} if admin else {server.api_key, server.admin_key} - {None}  # the admin key opens all
    if (admin or server.api_key is not None) and request.headers.get("authorization", "") not in {
            f"Bearer {k}" for k in keys}:
        raise ApiError(401, "Incorrect API key provided" + (" (this route needs the admin key)" if admin else ""),
                       kind="authentication_error", code="invalid_api_key")
    if server.served is None:
        raise ApiError(503, "the model is still loading; retry shortly", kind="server_error", code="loading",
                       headers={"Retry-After": "2"})
    return server.served


async def _body(request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def _complete(server, request, kind: str):
    from loraq.serving import responses

    served = _ready(server, request)
    body = await _body(request)
    try:
        job = served.parse(body, kind)
        await asyncio.to_thread(served.prefetch, job)
        pending = served.scheduler.submit(job, asyncio.get_running_loop())
    except ApiError as exc:
        server.metrics.refused(str(body.get("model", "")), exc.status)
        raise
    shaper = served.shaper(job)
    if job.stream:
        return StreamingResponse(_streamed(served, pending, shaper), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    waiting = asyncio.ensure_future(responses.collect(shaper, pending.queue))
    try:
        while not waiting.done():  # a client that hangs up frees its rows
            await asyncio.wait({waiting}, timeout=0.25)
            if not waiting.done() and await request.is_disconnected():
                waiting.cancel()
                served.scheduler.cancel(pending)
                return None
        return waiting.result()
    finally:
        if not waiting.done():
            waiting.cancel()
            served.scheduler.cancel(pending)


async def _streamed(served, pending, shaper):
    from loraq.serving import responses

    finished = False
    try:
        async for piece in responses.stream(shaper, pending.queue):
            yield piece
        finished = True
    finally:
        if not finished:  # the client went away mid-stream: its rows leave the batch at once
            served.scheduler.cancel(pending)
