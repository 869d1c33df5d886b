"""aiohttp's lane: the routes passed through to llama-server, as a wire adapter around gateway.pipeline.

The gate middleware (gateway.app) has already made the request's Exchange, checked its limits and its key; these
handlers read the body, check it (lifecycle.request_rules), and hand the exchange to the pipeline with a Wire that
builds aiohttp responses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from aiohttp import web

from gateway.decorate import decorate
from gateway.errors import error_response
from gateway.pipeline import SSE_HEADERS, unavailable
from gateway.routes import GET_ROUTES, JSON_ROUTES, MODEL_ROUTE
from gateway.scopes import model_refusal
from gateway.state import EXCHANGE, LIMITS, PIPELINE, SETTINGS
from lifecycle.request_rules import RequestRejected, admit_body
from lifecycle.settings import passthrough_methods

log = logging.getLogger("gateway.proxy")


class AiohttpWire:
    """gateway.pipeline.Wire for aiohttp: a whole answer becomes the handler's web.Response (the gate middleware
    decorates it); a stream is a StreamResponse decorated and prepared here."""

    __slots__ = ("request", "response")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    def send(self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        self.response = web.Response(status=status, body=body, headers={"Content-Type": content_type,
                                                                          **(headers or {})})

    async def open(self, status: int) -> None:
        out = web.StreamResponse(status=status, headers=SSE_HEADERS)
        decorate(self.request, out)
        await out.prepare(self.request)
        self.response = out

    async def write(self, chunk: bytes) -> None:
        assert self.response is not None
        await self.response.write(chunk)

    async def close(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    def answer(self) -> web.StreamResponse:
        assert self.response is not None, "the pipeline gave no answer"
        return self.response


async def read_body(request: web.Request) -> bytes:
    """The whole body, within CLIENT_TIMEOUT: a slow or stalled client gets 408 and never holds a slot."""
    if request.content.is_eof():  # the usual case: the whole body came with the headers
        return await request.read()
    timeout = request.app[SETTINGS].client_timeout
    try:
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise web.HTTPRequestTimeout(reason=f"the request body did not arrive within {timeout:g}s") from None


async def proxy_json(request: web.Request) -> web.StreamResponse:
    """POST to a JSON route: the body's rules, then the pipeline (queue, upstream, relay)."""
    app, ex = request.app, request[EXCHANGE]
    try:
        parsed, ex.body, ex.slots, ex.model = admit_body(await read_body(request), app[LIMITS], request.path)
    except RequestRejected as exc:
        ex.rejected = "invalid"
        return error_response(exc.status, str(exc), exc.code, param=exc.param)
    caller = ex.caller.entry if ex.caller is not None else None
    refused = model_refusal(caller, app[PIPELINE].names(ex.model)) if caller is not None and caller.models else None
    if refused is not None:
        ex.rejected = refused.reason
        return error_response(refused.status, refused.message, refused.code, param="model")
    ex.stream = parsed.get("stream") is True
    wire = AiohttpWire(request)
    await app[PIPELINE].run(ex, wire)
    return wire.answer()


async def proxy_get(request: web.Request) -> web.StreamResponse:
    wire = AiohttpWire(request)
    await request.app[PIPELINE].run(request[EXCHANGE], wire)
    return wire.answer()


async def proxy_passthrough(request: web.Request) -> web.StreamResponse:
    """A read-only llama-server route opened with PASSTHROUGH_ROUTES (/props, /slots, /lora-adapters): GET, whole
    answers only."""
    pipeline, ex = request.app[PIPELINE], request[EXCHANGE]
    wire = AiohttpWire(request)
    if not pipeline.backend.ready:
        pipeline.refuse(ex, wire, unavailable(pipeline.backend.state.value))
        return wire.answer()
    body = await read_body(request) if request.can_read_body else None
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")} if body else None
    pipeline.answer(ex, wire, await pipeline.whole(request.method, request.path, body, headers, ex.request_id))
    return wire.answer()


def add_routes(app: web.Application, passthrough: tuple[str, ...] = ()) -> None:
    """Only these routes reach llama-server; its /slots, /props, web UI and the rest stay closed unless opened."""
    for path in JSON_ROUTES:
        app.router.add_post(path, proxy_json)
    for path in GET_ROUTES:
        app.router.add_get(path, proxy_get, allow_head=False)
    app.router.add_get(MODEL_ROUTE, proxy_get, allow_head=False)
    for path in passthrough:
        for method in passthrough_methods(path):  # the one rule; Settings refused the routes it does not allow
            app.router.add_route(method, path, proxy_passthrough)
