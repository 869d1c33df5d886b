"""The headers the gateway adds to every answer it gives: X-Request-ID, CORS, and the caller's rate-limit state.

Called once per answer just before its headers go out: by the gate middleware for answers returned to it, and by
gateway.proxy's wire for streams, which send their headers from inside the handler. (An `on_response_prepare`
signal would do the same for every answer but costs a coroutine and a signal dispatch per request on the hot path.)
The fast lane writes the same headers itself (gateway.fastlane), as the parity tests check.
"""

from __future__ import annotations

from aiohttp import web

from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.state import CORS, EXCHANGE


def decorate(request: web.Request, response: web.StreamResponse) -> None:
    ex = request[EXCHANGE]
    ex.status = response.status
    headers = response.headers
    headers[REQUEST_ID_HEADER] = ex.request_id
    cors = request.app[CORS]
    if cors.enabled:
        cors.decorate(request, response)
    if ex.decision is not None:
        ex.decision.apply(headers)
    close_after_chunked(request, response)


def close_after_chunked(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """A chunked request ends the connection: aiohttp's C parser (3.14.5) carries a trailer header of one request
    into the next request on the same connection (its Authorization, its Origin), so nothing may follow it."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        response.force_close()
