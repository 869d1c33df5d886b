"""The headers the gateway adds to every answer it gives: X-Request-ID, CORS, and the caller's rate-limit state.

Called once per answer just before its headers go out: by the gate middleware for answers returned to it, and by
the proxy for streams, which send their headers from inside the handler. (An `on_response_prepare` signal would do
the same for every answer but costs a coroutine and a signal dispatch per request on the hot path.)
"""

from __future__ import annotations

from aiohttp import web

from gateway.appkeys import CORS, RATE, REQUEST_ID, SENT_STATUS
from gateway.ratelimit import Decision
from gateway.requestid import HEADER as REQUEST_ID_HEADER


def decorate(request: web.Request, response: web.StreamResponse) -> None:
    request[SENT_STATUS] = response.status
    headers = response.headers
    rid = request.get(REQUEST_ID)
    if rid is not None:
        headers[REQUEST_ID_HEADER] = rid
    cors = request.app[CORS]
    if cors.enabled:
        cors.decorate(request, response)
    decision: Decision | None = request.get(RATE)
    if decision is not None:
        decision.apply(headers)
    close_after_chunked(request, response)


def close_after_chunked(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """A chunked request ends the connection: aiohttp's C parser (3.14.5) carries a trailer header of one request
    into the next request on the same connection (its Authorization, its Origin), so nothing may follow it."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        response.force_close()
