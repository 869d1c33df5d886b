"""OpenAI routes passed through to llama-server: bodies forwarded as received, streams as they arrive."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from aiohttp import web

from gateway.admission import QueueFull, QueueTimeout
from gateway.appkeys import (
    ADMISSION,
    ANSWER,
    BACKEND,
    LIMITS,
    METRICS,
    REJECTED,
    REQUEST_ID,
    SETTINGS,
    STARTED,
    STATS,
    TTFT,
    UPSTREAM,
)
from gateway.decorate import decorate
from gateway.errors import error_response, sse_error_event
from gateway.metrics import StreamTail
from gateway.observe import JSON, SSE, Answer
from lifecycle.backend import Failure
from lifecycle.request_rules import RequestRejected, admit_body
from lifecycle.settings import passthrough_methods
from lifecycle.upstream import (
    Reply,
    Stream,
    UpstreamError,
    UpstreamTimeout,
)

log = logging.getLogger("gateway.proxy")

JSON_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
GET_ROUTES = ("/v1/models",)
RETRY_AFTER_LOADING = "5"
JSON_HEADERS = {"Content-Type": "application/json"}

# Response headers we set ourselves; llama-server's CORS headers never reach the client.
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def _unavailable(request: web.Request) -> web.Response | None:
    backend = request.app[BACKEND]
    if backend.ready:
        return None
    return error_response(
        503, f"the model backend is {backend.state.value}; retry shortly", "backend_unavailable",
        headers={"Retry-After": RETRY_AFTER_LOADING},
    )


class Refusal(NamedTuple):
    """An error the gateway answers itself; both lanes (aiohttp's and gateway.fastlane) render it."""

    status: int
    message: str
    code: str | None = None
    headers: dict[str, str] | None = None

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.code, self.headers)


def queue_refusal(app: web.Application, exc: QueueFull | QueueTimeout) -> tuple[Refusal, str]:
    """The 503 for a request that got no backend slot, and its rejection reason."""
    app[STATS].queue_rejections += 1
    retry_after = {"Retry-After": str(max(1, round(app[SETTINGS].queue_timeout / 4)))}
    if isinstance(exc, QueueFull):
        return Refusal(503, "the request queue is full; retry shortly", "queue_full", retry_after), "queue_full"
    return (Refusal(503, "no backend slot became free in time; retry shortly", "queue_timeout", retry_after),
            "queue_timeout")


async def backend_failed(app: web.Application, method: str, path: str, request_id: str, exc: UpstreamError) -> Refusal:
    """The answer to a failed upstream request, as lifecycle.backend.Backend.classify reads the failure: 503 while
    the backend restarts (nothing reached it, or it died under the request), 504 when it did not answer in time,
    502 otherwise."""
    log.warning("backend request %s %s failed: %s (request_id=%s)", method, path, exc, request_id)
    backend = app[BACKEND]
    failure = await backend.classify(exc, backend.pid)
    if failure is Failure.TOO_LARGE:
        return Refusal(502, f"the model backend's answer is larger than {app[SETTINGS].max_response_size} bytes "
                            "(MAX_RESPONSE_SIZE)", "backend_answer_too_large")
    if failure is Failure.RESTARTING:
        return Refusal(503, "the model backend is restarting; retry shortly", "backend_unavailable",
                       {"Retry-After": RETRY_AFTER_LOADING})
    if failure is Failure.TIMEOUT:
        return Refusal(504, "the model backend did not answer in time")
    return Refusal(502, "the model backend did not answer", "backend_error")


async def fetch(
    app: web.Application, method: str, path: str, body: bytes | None, headers: dict[str, str] | None, request_id: str
) -> Reply | Refusal:
    """One whole answer from llama-server, or the error to give instead (502, 503, 504)."""
    timeout = app[SETTINGS].request_timeout
    try:
        return await app[UPSTREAM].request(method, path, body=body, headers=headers, timeout=timeout)
    except UpstreamTimeout:
        log.warning("backend request %s %s timed out after %gs (request_id=%s)", method, path, timeout, request_id)
        return Refusal(504, f"the model backend did not answer within {timeout:g}s (REQUEST_TIMEOUT)")
    except UpstreamError as exc:
        return await backend_failed(app, method, path, request_id, exc)


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
    if (refused := _unavailable(request)) is not None:
        return refused
    app = request.app
    try:
        parsed, body, slots = admit_body(await read_body(request), app[LIMITS])
    except RequestRejected as exc:
        request[REJECTED] = "invalid"
        return error_response(400, str(exc), exc.code, param=exc.param)
    # Only now, with the whole body in hand and checked, does the request wait for its backend slots.
    admission, metrics = app[ADMISSION], app[METRICS]
    try:
        waited = await admission.acquire(slots)
    except (QueueFull, QueueTimeout) as exc:
        refusal, request[REJECTED] = queue_refusal(app, exc)
        return refusal.response()
    metrics.observe_queue_wait(waited)
    headers = {**JSON_HEADERS, "X-Request-ID": request[REQUEST_ID]}
    try:
        if parsed.get("stream") is True:
            return await _stream(request, body, headers)
        response = await _fetch(request, "POST", body, headers)
        if response.status == 200 and isinstance(response.body, bytes):
            request[ANSWER] = Answer(JSON, response.body)  # its tokens are counted in the batch (gateway.observe)
        return response
    finally:
        admission.release(slots)


async def proxy_get(request: web.Request) -> web.StreamResponse:
    if (refused := _unavailable(request)) is not None:
        return refused
    return await _fetch(request, "GET", None, {"X-Request-ID": request[REQUEST_ID]})


async def _fetch(
    request: web.Request, method: str, body: bytes | None, headers: dict[str, str] | None
) -> web.Response:
    reply = await fetch(request.app, method, request.path, body, headers, request[REQUEST_ID])
    if isinstance(reply, Refusal):
        return reply.response()
    return web.Response(status=reply.status, body=reply.body,
                        headers={"Content-Type": reply.content_type or "application/json"})


async def open_events(
    app: web.Application, path: str, body: bytes, headers: dict[str, str], request_id: str
) -> Stream | Reply | Refusal:
    """Start a streamed answer (both lanes): the event stream, to be closed by the caller; or llama-server's whole
    answer when it refused before streaming (e.g. a prompt over the context); or the error to give instead."""
    try:
        resp = await app[UPSTREAM].open_stream("POST", path, body=body, headers=headers)
    except UpstreamTimeout:
        log.warning("backend stream %s did not start within STREAM_IDLE_TIMEOUT (request_id=%s)", path, request_id)
        return Refusal(504, "the model backend did not start answering in time (STREAM_IDLE_TIMEOUT)")
    except UpstreamError as exc:
        return await backend_failed(app, "POST", path, request_id, exc)
    if resp.content_type.startswith("text/event-stream"):
        return resp
    async with resp:
        try:
            return Reply(resp.status, resp.content_type, await resp.read_all(app[SETTINGS].max_response_size))
        except UpstreamError as exc:
            return await backend_failed(app, "POST", path, request_id, exc)


async def _stream(request: web.Request, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
    opened = await open_events(request.app, request.path, body, headers, request[REQUEST_ID])
    if isinstance(opened, Refusal):
        return opened.response()
    if isinstance(opened, Reply):
        return web.Response(status=opened.status, body=opened.body,
                            headers={"Content-Type": opened.content_type or "application/json"})
    async with opened:
        return await _pass_events(request, opened)


async def _pass_events(request: web.Request, resp: Stream) -> web.StreamResponse:
    out = web.StreamResponse(status=resp.status, headers=SSE_HEADERS)
    decorate(request, out)
    await out.prepare(request)
    tail = StreamTail()  # the last few KB, where llama-server puts usage and timings
    try:
        client_left = await relay(resp, out.write, tail, request.path, request[REQUEST_ID])
    finally:
        # Also when cancelled: a client that closes as soon as it reads [DONE] cancels this handler.
        request[ANSWER] = Answer(SSE, bytes(tail))
        if tail.first_at is not None:
            request[TTFT] = tail.first_at - request[STARTED]
            request.app[METRICS].observe_ttft(request.path, request[TTFT])
    if not client_left:
        await out.write_eof()
    return out


async def relay(
    resp: Stream, write: Callable[[bytes], Awaitable[None]], tail: StreamTail, path: str, request_id: str
) -> bool:
    """Pass the backend's events on as they arrive, through `write` (both lanes); True when the client left.

    tail.first_at is when the first piece arrived (monotonic), for time-to-first-token."""
    chunk = b"\n\n"
    while True:
        last = chunk
        try:
            chunk = await resp.read()
        except UpstreamError as exc:
            # The status line is long gone: the failure is reported inside the stream.
            timed_out = isinstance(exc, UpstreamTimeout)
            log.warning("backend stream %s: %s (request_id=%s)", "went idle" if timed_out else "broke off", exc,
                        request_id)
            message = ("the model backend sent nothing for too long (STREAM_IDLE_TIMEOUT)" if timed_out
                       else "the model backend broke off the stream")
            chunk, failed = sse_error_event(message, "backend_timeout" if timed_out else "backend_error"), True
            if not last.endswith(b"\n\n"):
                chunk = b"\n\n" + chunk  # end the backend's half-sent event first
        else:
            failed = False
        if not chunk:
            return False
        if tail.first_at is None and not failed:
            tail.first_at = time.monotonic()
        tail.feed(chunk)
        try:
            await write(chunk)
        except ConnectionError:
            resp.close()  # the client left: drop the upstream request so llama-server stops generating
            return True
        if failed:
            return False


async def proxy_passthrough(request: web.Request) -> web.StreamResponse:
    """A llama-server route opened with PASSTHROUGH_ROUTES (e.g. /props, /slots, /tokenize): whole answers only."""
    if (refused := _unavailable(request)) is not None:
        return refused
    body = await read_body(request) if request.can_read_body else None
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")} if body else None
    return await _fetch(request, request.method, body, headers)


def add_routes(app: web.Application, passthrough: tuple[str, ...] = ()) -> None:
    """Only these routes reach llama-server; its /slots, /props, web UI and the rest stay closed unless opened."""
    for path in JSON_ROUTES:
        app.router.add_post(path, proxy_json)
    for path in GET_ROUTES:
        app.router.add_get(path, proxy_get, allow_head=False)
    for path in passthrough:
        for method in passthrough_methods(path):  # the one rule; Settings refused the routes it does not allow
            app.router.add_route(method, path, proxy_passthrough)
