"""The client to llama-server, shared by the gateway and the serverless handler.

Both paths are asyncio protocols whose responses are parsed by httptools (uvicorn's C parser); with aiohttp's
general-purpose client a whole answer cost 2.3x the CPU, and a short stream through the gateway about 1.9x
(bench/RESULTS.md).
- `request()`, for whole (non-streaming) answers: a small keep-alive pool. A request is one pre-rendered write and
  one parsed read.
- `open_stream()`, for server-sent events: a new connection each time, because llama-server closes the connection
  after every streamed answer anyway, so pooling them only produces dead connections. The body is handed out piece
  by piece as it arrives; closing the stream closes the connection, which makes llama-server stop generating.

Stale connections: llama-server closes keep-alive connections after 5 s idle. The pool forgets idle connections
sooner (KEEPALIVE_TIMEOUT), and if a request on a *reused* connection fails before any response byte arrives (the
backend closed it while our request was on its way, so it never read it), it is sent once more on a new
connection. A request that failed on a new connection, or after response bytes arrived, is never re-sent: the
backend may have read it, and a generation must never run twice.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

import httptools

KEEPALIVE_TIMEOUT = 3.0
MAX_IDLE = 64
STREAM_HIGH_WATER = 256 * 1024  # bytes buffered from a stream before we stop reading the socket


class UpstreamError(Exception):
    """The backend could not be reached, or broke off its answer."""


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    pass


class UpstreamTooLarge(UpstreamError):
    """The backend's whole answer is larger than MAX_RESPONSE_SIZE: it was dropped, not buffered."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the backend's answer is larger than {limit} bytes (MAX_RESPONSE_SIZE)")
        self.limit = limit


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

    def __init__(self, loop: asyncio.AbstractEventLoop, max_size: int | None = None) -> None:
        self.loop = loop
        self.max_size = max_size
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._waiter: asyncio.Future[Reply] | None = None
        self._chunks: list[bytes] = []
        self._size = 0
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
        self._size += len(body)
        if self.max_size is not None and self._size > self.max_size:
            self._chunks, self._parser = [], None  # drop what came; the connection is out of step now
            self._fail(UpstreamTooLarge(self.max_size))
            self.close()

    def on_message_complete(self) -> None:
        if self._parser is None:
            return  # dropped as too large
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
        self._content_type, self._got_bytes, self._size = "", False, 0
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


class Stream(asyncio.Protocol):
    """One streamed answer on its own connection. `Upstream.open_stream()` returns it once the status line and
    headers are in; then `read()` hands out the body piece by piece, as it arrives.

    Use it as an async context manager (or call close()): leaving early closes the connection, and llama-server
    stops generating for a connection that is gone.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, idle_timeout: float | None) -> None:
        self.loop = loop
        self.idle_timeout = idle_timeout
        self.status = 0
        self.content_type = ""
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._done = False  # the whole body arrived
        self._error: UpstreamError | None = None
        self._got_body = False
        self._waiter: asyncio.Future[None] | None = None
        self._head: asyncio.Future[None] = loop.create_future()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._done and self._error is None:
            self._error = UpstreamDisconnected(self._got_body or self._head.done())
        self._wake()

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._error = UpstreamError(f"unparseable answer from the backend: {exc}")
            self.close()
            self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.content_type = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        self._got_body = True
        self._pieces.append(body)
        self._buffered += len(body)
        if self._buffered > STREAM_HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True  # a slow client: let TCP push back on the backend instead of buffering here
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._done = True
        self.close()  # llama-server closes it too; nothing else will come on this connection
        self._wake()

    # the reading side
    def _wake(self) -> None:
        if not self._head.done():
            self._head.set_exception(self._error or UpstreamDisconnected(False))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _expire(self) -> None:
        self._error = UpstreamTimeout(f"the backend sent nothing for {self.idle_timeout:g}s")
        self.close()
        self._wake()

    async def _wait(self, what: asyncio.Future[None]) -> None:
        timer = None if self.idle_timeout is None else self.loop.call_later(self.idle_timeout, self._expire)
        try:
            await what
        finally:
            if timer is not None:
                timer.cancel()

    async def head(self) -> None:
        """Wait for the status line and headers (at most idle_timeout)."""
        try:
            await self._wait(self._head)
        except BaseException:
            self._head.cancel()  # nobody will look at it again (no "exception never retrieved" at exit)
            self.close()
            raise

    async def read(self) -> bytes:
        """Everything of the body that has arrived and not been read yet, waiting for more when nothing has;
        b"" once the body is complete. Raises UpstreamTimeout when the backend sends nothing for idle_timeout
        seconds, UpstreamDisconnected when it breaks off.

        Pieces that arrived together are handed out together, so a caller that fell behind catches up with one
        write instead of one per piece."""
        while not self._pieces:
            if self._done:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self.loop.create_future()
            await self._wait(self._waiter)
        pieces = self._pieces
        data = pieces.popleft() if len(pieces) == 1 else b"".join(pieces)
        pieces.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def read_all(self, max_size: int | None = None) -> bytes:
        """The rest of the body; UpstreamTooLarge (and the connection closed) once it passes `max_size` bytes."""
        pieces, size = [], 0
        while piece := await self.read():
            pieces.append(piece)
            size += len(piece)
            if max_size is not None and size > max_size:
                self.close()
                raise UpstreamTooLarge(max_size)
        return b"".join(pieces)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Upstream:
    def __init__(
        self, base_url: str, api_key: str, *, connect_timeout: float = 10.0, stream_idle_timeout: float | None = None,
        max_response_size: int | None = None,
    ) -> None:
        url = urlsplit(base_url)
        self.base_url = base_url.rstrip("/")
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.connect_timeout = connect_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.max_response_size = max_response_size  # of a whole answer (request); streams are passed on, not kept
        # The key lives only inside the pre-rendered head; nothing public holds it (lifecycle.backend hands us out).
        self._prefix = f"Host: {self.host}:{self.port}\r\nAuthorization: Bearer {api_key}\r\n"
        self._idle: list[_Connection] = []

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

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
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, self.max_response_size), self.host, self.port)
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

    async def request(
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

    # --- server-sent events: one new connection per stream --------------------------------------------

    async def open_stream(
        self, method: str, path: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Stream:
        """Send one request on a new connection and wait for the answer's headers (at most stream_idle_timeout).

        Raises UpstreamConnectError when the backend cannot be reached (nothing was sent), UpstreamTimeout or
        UpstreamDisconnected when it does not answer."""
        loop = asyncio.get_running_loop()
        stream = Stream(loop, self.stream_idle_timeout)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: stream, self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(f"cannot connect to the backend at {self.host}:{self.port}: {exc}") from None
        assert stream.transport is not None
        stream.transport.write(self._render(method, path, body, headers))
        await stream.head()
        return stream
