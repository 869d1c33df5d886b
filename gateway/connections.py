"""Client connections: how many may be open, how long one may leave an answer unread, and aiohttp's own error
answers. Shared by the fast lane (gateway.fastlane) and aiohttp's protocol, so a connection obeys the same rules
whichever lane serves it.

1. MAX_CONNECTIONS: a connection over the cap gets one 503 and is closed before anything of it is read. A
   connection the fast lane hands to aiohttp is counted once.
2. CLIENT_TIMEOUT also bounds a write: a client that reads nothing for that long while an answer (a stream, or a
   large whole answer) waits for it is dropped. Its request is cancelled, so its backend slot is freed and
   llama-server stops generating for it. (Without this, a client that never reads held a slot forever.)
3. aiohttp's parser errors (malformed requests, too many or too long headers) are answered as OpenAI-shaped JSON
   that never echoes the offending bytes, which may hold a key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from gateway.errors import INTERNAL_ERROR, error_body, error_response
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import RequestIds

log = logging.getLogger("gateway.connections")

_FULL_BODY = error_body(503, "too many open connections; retry shortly (MAX_CONNECTIONS)", "too_many_connections")


def refusal_bytes(request_id: str) -> bytes:
    """The whole answer a connection over MAX_CONNECTIONS gets."""
    return (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(_FULL_BODY)}\r\nRetry-After: 1\r\nConnection: close\r\n"
        f"{REQUEST_ID_HEADER}: {request_id}\r\n\r\n"
    ).encode() + _FULL_BODY


class Connections:
    """Open client connections on one port, against MAX_CONNECTIONS; lives on the event loop."""

    def __init__(self, limit: int, request_ids: RequestIds, on_refused: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.open = 0
        self.refused = 0
        self.request_ids = request_ids
        self._on_refused = on_refused

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection, or answer 503 and close it when the cap is reached."""
        if self.open >= self.limit:
            self.refused += 1
            if self._on_refused is not None:
                self._on_refused()
            if not transport.is_closing():
                transport.write(refusal_bytes(self.request_ids.new()))  # type: ignore[attr-defined]
                transport.close()
            return False
        self.open += 1
        return True

    def release(self) -> None:
        self.open -= 1


class WriteStall:
    """Drops a client that reads nothing for `timeout` seconds while the transport's buffer is full
    (asyncio's pause_writing() until resume_writing())."""

    __slots__ = ("timeout", "timer")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.timer: asyncio.TimerHandle | None = None

    def paused(self, transport: asyncio.BaseTransport | None) -> None:
        if self.timer is None and transport is not None:
            self.timer = asyncio.get_running_loop().call_later(self.timeout, self._drop, transport)

    def resumed(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _drop(self, transport: asyncio.BaseTransport) -> None:
        self.timer = None
        if not transport.is_closing():
            peer = transport.get_extra_info("peername")
            log.warning("client %s read nothing for %gs while its answer waited (CLIENT_TIMEOUT): dropped",
                        peer[0] if isinstance(peer, (tuple, list)) and peer else "unknown", self.timeout)
            transport.abort()  # type: ignore[attr-defined]


def parser_error(exc: BaseException | None, max_line_size: int) -> tuple[int, str, str]:
    """(status, message, code) for a request aiohttp's parser refused; never quotes the request."""
    if isinstance(exc, LineTooLong):
        if exc.args[1:2] == (max_line_size,):
            return 414, f"the request line is longer than {max_line_size} bytes", "uri_too_long"
        return 431, "a header line is too long (MAX_HEADER_LINE_SIZE)", "headers_too_large"
    if isinstance(exc, BadHttpMessage) and exc.message.startswith("Too many headers"):
        return 431, "too many request headers (MAX_HEADERS)", "headers_too_large"
    name = type(exc).__name__ if exc is not None else "unknown"
    return 400, f"malformed HTTP request ({name})", "bad_request"


class GatewayRequestHandler(RequestHandler):
    """aiohttp's protocol with the rules of this module."""

    __slots__ = ("_stall", "counted")

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.counted = False  # True once a fast-lane connection that was already counted is handed over
        self._stall = WriteStall(manager.write_timeout)

    @property
    def _gateway(self) -> GatewayServer:
        return self._manager  # type: ignore[return-value]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.counted:
            self.counted = self._gateway.open_connections.admit(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stall.resumed()
        if self.counted:
            self.counted = False
            self._gateway.open_connections.release()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._stall.paused(self.transport)

    def resume_writing(self) -> None:
        self._stall.resumed()
        super().resume_writing()

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("an answer is already under way; cannot send an error answer")
        if status >= 500:
            log.error("unexpected error on a request from %s: %s", request.remote, type(exc).__name__)
            status, text, code = 500, INTERNAL_ERROR, "internal_error"
        else:
            status, text, code = parser_error(exc, self._gateway.max_line_size)
            log.info("bad request from %s: %s (%d)", request.remote, type(exc).__name__, status)
        response = error_response(status, text, code,
                                  headers={REQUEST_ID_HEADER: self._gateway.open_connections.request_ids.new()})
        response.force_close()
        return response


class GatewayServer(web.Server):
    """aiohttp's protocol factory, making GatewayRequestHandlers. Made from the runner's own server by adopt()."""

    open_connections: Connections
    write_timeout: float
    max_line_size: int

    def __call__(self) -> GatewayRequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)


def adopt(server: web.Server, connections: Connections, write_timeout: float) -> GatewayServer:
    """Turn the server an AppRunner made into a GatewayServer (aiohttp has no hook to choose the protocol
    class, and its runner builds the server itself)."""
    server.__class__ = GatewayServer
    assert isinstance(server, GatewayServer)
    server.open_connections = connections
    server.write_timeout = write_timeout
    server.max_line_size = int(server._kwargs.get("max_line_size", 8190))
    return server
