"""The client to llama-server, shared by the gateway and the serverless handler.

Two paths, because their costs differ:
- `fetch()`, for whole (non-streaming) answers, is the hot path: a small keep-alive pool of asyncio protocols
  whose responses are parsed by httptools (uvicorn's C parser). A request is one pre-rendered write and one
  parsed read; aiohttp's general-purpose client cost 2.3x the CPU here (bench/RESULTS.md).
- `stream()`, for server-sent events, uses aiohttp on a new connection each time: llama-server closes the
  connection after every streamed answer anyway, so pooling them only produces dead connections.

Stale connections: llama-server closes keep-alive connections after 5 s idle. The pool forgets idle connections
sooner (KEEPALIVE_TIMEOUT), and if a request on a *reused* connection fails before any response byte arrives (the
backend closed it while our request was on its way, so it never read it), it is sent once more on a new
connection. A request that failed on a new connection, or after response bytes arrived, is never re-sent: the
backend may have read it, and a generation must never run twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httptools

KEEPALIVE_TIMEOUT = 3.0
MAX_IDLE = 64


class UpstreamError(Exception):
    """The backend could not be reached, or broke off its answer."""


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamDisconnected(UpstreamError):
    def __init__(self, got_bytes: bool) -> None:
        super().__init__("the backend closed the connection" + (" mid-answer" if got_bytes else ""))
        self.got_bytes = got_bytes


@dataclass(slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[Reply] | None = None
        self._chunks: list[bytes] = []
        self._content_type = ""
        self._got_bytes = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamDisconnected(self._got_bytes))

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # bytes nobody asked for: the connection is out of step
            self.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"unparseable answer from the backend: {exc}"))
            self.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self._content_type = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        parser, self._parser = self._parser, None
        assert parser is not None
        reply = Reply(parser.get_status_code(), self._content_type, b"".join(self._chunks))
        self._chunks = []
        if not parser.should_keep_alive():
            self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(reply)

    def send(self, data: bytes) -> asyncio.Future[Reply]:
        assert self.transport is not None and self._parser is None
        self._parser = httptools.HttpResponseParser(self)
        self._content_type, self._got_bytes = "", False
        self._waiter = self.loop.create_future()
        self.transport.write(data)
        return self._waiter

    def expire(self) -> None:
        self._fail(UpstreamTimeout("the backend did not answer in time"))

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Upstream:
    def __init__(
        self, base_url: str, api_key: str, *, connect_timeout: float = 10.0, stream_idle_timeout: float | None = None
    ) -> None:
        url = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.auth = f"Bearer {api_key}"
        self.connect_timeout = connect_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self._prefix = f"Host: {self.host}:{self.port}\r\nAuthorization: {self.auth}\r\n"
        self._idle: list[_Connection] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # The backend is an IP address: no DNS, so no resolver threads either.
            connector=aiohttp.TCPConnector(limit=0, force_close=True, resolver=aiohttp.ThreadedResolver()),
            # sock_read: the longest silence allowed between two pieces of a stream.
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout,
                                          sock_read=self.stream_idle_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- whole answers: the pooled fast path -----------------------------------------------------------

    def _render(self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None) -> bytes:
        head = f"{method} {path} HTTP/1.1\r\n{self._prefix}"
        if headers:
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        if body is None:
            return (head + "\r\n").encode("latin-1")
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode("latin-1") + body

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop), self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to the backend at {self.host}:{self.port}: {exc}") from None
        return conn

    async def _acquire(self, loop: asyncio.AbstractEventLoop, now: float) -> tuple[_Connection, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_TIMEOUT:
                return conn, True
            conn.close()
        return await self._connect(loop), False

    def _release(self, conn: _Connection) -> None:
        if conn.closed:
            return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)
        if len(self._idle) > MAX_IDLE:
            self._idle.pop(0).close()

    async def _exchange(self, conn: _Connection, data: bytes, deadline: float | None) -> Reply:
        waiter = conn.send(data)
        # A timer that fails the waiter is far cheaper than asyncio.timeout() on this path.
        timer = None if deadline is None else conn.loop.call_at(deadline, conn.expire)
        try:
            reply = await waiter
        except BaseException:
            conn.close()  # cancelled, failed or timed out mid-request: never reuse a connection out of step
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._release(conn)
        return reply

    async def fetch(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """Send one request and read the whole answer; UpstreamTimeout after `timeout` seconds."""
        data = self._render(method, path, body, headers)
        loop = asyncio.get_running_loop()  # once: each call is a getpid() system call
        now = loop.time()
        deadline = None if timeout is None else now + timeout
        conn, reused = await self._acquire(loop, now)
        try:
            return await self._exchange(conn, data, deadline)
        except UpstreamDisconnected as exc:
            if not reused or exc.got_bytes:
                raise
        return await self._exchange(await self._connect(loop), data, deadline)

    # --- server-sent events: aiohttp, one connection per stream ----------------------------------------

    async def stream(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> aiohttp.ClientResponse:
        """Send one request on a new connection; the caller reads and releases the response (`async with`)."""
        assert self._session is not None, "Upstream.start() was not awaited"
        sent = {"Authorization": self.auth, **(headers or {})}
        return await self._session.request(method, self.base_url + path, data=body, headers=sent, **kwargs)
