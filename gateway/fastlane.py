"""The fast lane: plain API calls answered without aiohttp's per-request machinery; everything else goes to aiohttp.

PORT is served by this asyncio protocol, with HTTP parsed by httptools. A request takes the fast lane only when it
is the common case, which is decided before anything is done for it:
1. it arrived whole and alone in one read (nothing half-sent, nothing pipelined behind it), as HTTP/1.1 keep-alive
   (no `Connection: close`), with exactly one Host header and a Content-Length body (none for GET), within the
   header limits and MAX_REQUEST_BODY_SIZE;
2. it is POST /v1/chat/completions, /v1/completions or /v1/embeddings, or GET /v1/models, with no query string,
   and no Origin, Expect, Upgrade or Transfer-Encoding header;
3. the backend is ready and the gateway is not draining;
4. with AUTH_ENABLED, its key is known and unexpired and its address is not blocked for failed keys (before the
   body is parsed);
5. its body passes lifecycle.request_rules (strict JSON, capped fields), the same functions aiohttp's lane calls;
6. its rate limit lets it through (the last check, the only one that uses anything up).
Anything else hands the connection, with every byte of that request, to aiohttp's server, which runs the whole gate
(gateway.app) and keeps the connection from then on. So refusals, preflights, probes and odd framing have one
implementation, aiohttp's; a handed-over request is checked again from scratch, and nothing was counted for it.
What the fast lane answers itself are the outcomes of a request it took: the backend's answer or event stream
(relayed by gateway.proxy.relay, as in the aiohttp lane), or the queue and backend errors of gateway.proxy. It
records them like the aiohttp lane does (stats, metrics, time to first token, access log).

Why: at 32 concurrent clients aiohttp's request and response objects cost about as much CPU as everything the
gateway does for a request (bench/RESULTS.md). FAST_LANE=false sends every request through aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from gateway.admission import QueueFull, QueueTimeout
from gateway.appkeys import (
    ADMISSION,
    BACKEND,
    CONNECTIONS,
    DRAIN,
    FAILURES,
    KEYS,
    LIMITER,
    LIMITS,
    METRICS,
    OBSERVER,
    REQUEST_IDS,
    SETTINGS,
    STATS,
)
from gateway.auth import caller_key
from gateway.connections import GatewayServer, WriteStall
from gateway.errors import CLIENT_CLOSED, error_body
from gateway.metrics import StreamTail
from gateway.observe import JSON, SSE, Answer
from gateway.proxy import (
    GET_ROUTES,
    JSON_ROUTES,
    SSE_HEADERS,
    Refusal,
    fetch,
    open_events,
    queue_refusal,
    relay,
)
from gateway.ratelimit import Decision
from lifecycle.request_rules import RequestRejected, admit_body
from lifecycle.upstream import Reply, Stream

log = logging.getLogger("gateway.fastlane")

# Headers that send a request to aiohttp: browsers (CORS), 100-continue, protocol switches, chunked bodies.
_HAND_OVER = frozenset({b"origin", b"expect", b"upgrade", b"transfer-encoding", b"access-control-request-method"})
_PAUSE_AT = 1 << 20  # bytes of pipelined requests held while one is answered, before we stop reading
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Job(NamedTuple):
    """A request the fast lane took."""

    started: float  # time.monotonic() when its bytes were looked at
    method: str
    path: str
    body: bytes | None  # None for GET
    stream: bool  # "stream": true
    request_id: str
    key_id: str
    decision: Decision | None  # the rate limit's, for its headers (None with AUTH_ENABLED=false)
    slots: int  # backend slots it holds (lifecycle.request_rules.slots_needed)


class FastLane:
    """The protocol factory for PORT; one per app. Holds what the hot path reads, looked up once, and the open
    fast-lane connections (closed at shutdown)."""

    def __init__(self, app: web.Application, server: GatewayServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server  # aiohttp's protocol factory: takes the connections handed over
        self.loop = loop
        self.app = app
        self.settings = settings = app[SETTINGS]
        self.backend, self.drain, self.stats = app[BACKEND], app[DRAIN], app[STATS]
        self.admission, self.metrics, self.observer = app[ADMISSION], app[METRICS], app[OBSERVER]
        self.keys, self.limiter, self.failures = app[KEYS], app[LIMITER], app[FAILURES]
        self.request_ids, self.limits, self.open = app[REQUEST_IDS], app[LIMITS], app[CONNECTIONS]
        self.post_routes = {path.encode(): path for path in JSON_ROUTES}
        self.get_routes = {path.encode(): path for path in GET_ROUTES}
        self.max_headers, self.max_line = settings.max_headers, settings.max_header_line_size
        self.max_body = settings.max_request_body_size
        self.connections: set[FastConnection] = set()
        self._second = -1
        self._date = ""

    def __call__(self) -> FastConnection:
        return FastConnection(self)

    def date(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second, self._date = now, formatdate(now, usegmt=True)
        return self._date

    def close(self) -> None:
        """Shutdown: drop every fast-lane connection (their requests are cancelled)."""
        for conn in list(self.connections):
            conn.abort()


class FastConnection(asyncio.Protocol):
    """One client connection, until it is handed to aiohttp (or closed). At most one request is answered at a
    time; bytes that arrive meanwhile (pipelining) wait, and are looked at once the answer is written."""

    def __init__(self, lane: FastLane) -> None:
        self.lane = lane
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client = "unknown"
        self.task: asyncio.Task[None] | None = None  # the request being answered
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.read_paused = False
        self.write_paused = False
        self.last_active = 0.0
        self.idle: asyncio.TimerHandle | None = None
        self.drained: asyncio.Future[None] | None = None  # a stream waiting for a slow client
        self.stall = WriteStall(lane.settings.client_timeout)
        self.counted = False  # in lane.open (MAX_CONNECTIONS) until it closes or is handed over
        # the request being answered: the status whose headers went out, and what gateway.observe reads
        self.sent = 0
        self.answer: Answer | None = None
        self.ttft: float | None = None
        # the message being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._messages = 0
        self._complete = False
        self._keep_alive = False  # read when the headers are in: llhttp resets it once the message is complete

    # --- asyncio.Protocol -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.lane.open.admit(transport):
            return  # over MAX_CONNECTIONS: answered 503 and closed
        self.counted = True
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, (tuple, list)) and peer:
            self.client = str(peer[0])
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # as aiohttp does: notice dead peers
        self.lane.connections.add(self)
        self._touch()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lane.connections.discard(self)
        self.stall.resumed()
        if self.counted:
            self.counted = False
            self.lane.open.release()
        self.transport = None
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        if self.task is not None:
            self.task.cancel()  # the client left: leave the queue, or drop the upstream request

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # refused (MAX_CONNECTIONS)
        if self.task is not None or self.write_paused:
            self._hold(data)
            return
        self._take(data)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.stall.paused(self.transport)

    def resume_writing(self) -> None:
        self.stall.resumed()
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)
        if self.task is None:
            self._next()

    # --- httptools callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._messages += 1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    # --- deciding -----------------------------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """`data` starts a new request: answer it here, or hand it to aiohttp."""
        started = time.monotonic()
        self._url, self._headers, self._body, self._messages, self._complete = b"", [], [], 0, False
        self._keep_alive = False
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_over(data)
            return
        try:
            job = self._admit(started) if self._complete and self._messages == 1 else None
        except Exception:  # a bug here must not cost the request: aiohttp's lane answers it
            log.exception("the fast lane failed to look at a request; handing it to aiohttp")
            job = None
        if job is None:
            self._hand_over(data)
            return
        self.task = self.lane.loop.create_task(self._answer(job))

    def _admit(self, started: float) -> Job | None:
        """The job when the fast lane takes the request, else None. Nothing is used up unless it returns a job.

        The cheap checks come first: framing and headers, then the key (before the body is parsed, so a caller
        without a key costs no JSON parsing), then the body's rules (lifecycle.request_rules), and the rate limit
        last, the only check that uses anything up."""
        lane, parser = self.lane, self.parser
        if parser.get_http_version() != "1.1" or not self._keep_alive:
            return None
        method = parser.get_method()
        routes = lane.post_routes if method == b"POST" else lane.get_routes if method == b"GET" else None
        path = None if routes is None else routes.get(self._url)
        if path is None or lane.drain.draining or not lane.backend.ready:
            return None
        headers = self._headers
        if len(headers) > lane.max_headers:
            return None
        token = request_id = length = None
        hosts = 0
        for name, value in headers:
            if len(name) + len(value) + 2 > lane.max_line:
                return None
            lowered = name.lower()
            if lowered == b"authorization":
                if token is not None:
                    return None  # said twice: aiohttp's lane decides which one counts
                token = value
            elif lowered == b"x-request-id":
                if request_id is not None:
                    return None
                request_id = value
            elif lowered == b"content-length":
                if length is not None:
                    return None
                length = value
            elif lowered == b"host":
                hosts += 1
            elif lowered in _HAND_OVER:
                return None
        if hosts != 1:
            return None  # HTTP/1.1 needs exactly one Host: aiohttp's lane refuses the rest
        try:
            auth = token.decode("ascii") if token else ""
            rid = request_id.decode("ascii") if request_id else None
        except UnicodeDecodeError:
            return None
        key = self._key(auth)
        if key is None:
            return None
        body: bytes | None = None
        stream, slots = False, 1
        if method == b"POST":
            raw = b"".join(self._body)
            if length is None or len(raw) > lane.max_body:
                return None
            try:
                parsed, body, slots = admit_body(raw, lane.limits)
            except RequestRejected:
                return None  # aiohttp's lane gives the 400
            stream = parsed.get("stream") is True
        elif self._body:
            return None
        key_id, limit = key
        decision: Decision | None = None
        if key_id is not None and limit is not None:
            decision = lane.limiter.check(key_id, limit)
            if not decision.allowed:
                return None
        return Job(started, method.decode(), path, body, stream, lane.request_ids(rid), key_id or "anonymous",
                   decision, slots)

    def _key(self, header: str) -> tuple[str | None, int | None] | None:
        """(key id, its requests-per-minute limit) for a known, unexpired key; (None, None) with auth off; None to
        hand the request over. Uses nothing up."""
        lane = self.lane
        settings = lane.settings
        if not settings.auth_enabled:
            return None, None
        if not lane.failures.check(self.client, settings.auth_failure_limit, consume=False).allowed:
            return None
        entry = caller_key(lane.keys.ring, header)
        if entry is None:
            return None
        return entry.key_id, entry.rate_limit or settings.max_requests_per_minute

    def _hand_over(self, data: bytes) -> None:
        """From now on aiohttp's server owns this connection; `data` is everything since the request began."""
        transport = self.transport
        self.lane.connections.discard(self)
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None
        self.transport = None
        self.stall.resumed()
        if transport is None or transport.is_closing():
            return
        self.lane.stats.handed_over += 1
        protocol = self.lane.server()
        protocol.counted, self.counted = self.counted, False  # counted once, released when aiohttp's side closes
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.read_paused:
            transport.resume_reading()
        if self.write_paused:
            protocol.pause_writing()
        if data:
            protocol.data_received(data)

    # --- answering ----------------------------------------------------------------------------------------

    async def _answer(self, job: Job) -> None:
        lane = self.lane
        stats = lane.stats
        self.sent = 0
        status, rejected, self.answer, self.ttft = 500, None, None, None
        stats.begin()
        stats.fast_lane += 1
        try:
            if job.body is None:
                reply: Reply | Refusal | None = await fetch(lane.app, job.method, job.path, None,
                                                            {"X-Request-ID": job.request_id}, job.request_id)
            else:
                admission = lane.admission
                try:
                    waited = await admission.acquire(job.slots)
                except (QueueFull, QueueTimeout) as exc:
                    reply, rejected = queue_refusal(lane.app, exc)
                else:
                    lane.metrics.observe_queue_wait(waited)
                    headers = {"Content-Type": "application/json", "X-Request-ID": job.request_id}
                    try:
                        if job.stream:
                            reply = await self._stream(job, headers)
                        else:
                            reply = await fetch(lane.app, job.method, job.path, job.body, headers, job.request_id)
                    finally:
                        admission.release(job.slots)
            if isinstance(reply, Refusal):
                self._send(reply.status, "application/json", error_body(reply.status, reply.message, reply.code),
                           job, reply.headers)
            elif reply is not None:
                if reply.status == 200 and job.body is not None:
                    self.answer = Answer(JSON, reply.body)  # its tokens are counted in the batch (gateway.observe)
                self._send(reply.status, reply.content_type or "application/json", reply.body, job, None)
            status = self.sent
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client left before its answer (a stream counts with its own status)
            raise
        except Exception:
            log.exception("unexpected error on %s %s (request_id=%s)", job.method, job.path, job.request_id)
            if self.sent:  # a stream under way: all that can be done is to drop the connection, as aiohttp does
                if self.transport is not None:
                    self.transport.close()
            else:
                self._send(500, "application/json",
                           error_body(500, "internal error in the gateway; see its log", "internal_error"), job, None)
        finally:
            status = self.sent or status  # cancelled once the answer started: it counts with the status it sent
            stats.end(status)
            lane.observer.record(job.path, job.method, status, job.key_id, time.monotonic() - job.started,
                                 job.request_id, rejected, self.ttft, self.answer)
            self.task = None
        if not self.write_paused:
            self._next()

    async def _stream(self, job: Job, headers: dict[str, str]) -> Reply | Refusal | None:
        """Pass an event stream on as chunked transfer encoding; None once it was sent."""
        assert job.body is not None
        opened = await open_events(self.lane.app, job.path, job.body, headers, job.request_id)
        if not isinstance(opened, Stream):
            return opened
        async with opened:
            self._write(self._head(opened.status, SSE_HEADERS, job, None) + b"Transfer-Encoding: chunked\r\n\r\n")
            self.sent = opened.status
            tail = StreamTail()  # the last few KB, where llama-server puts usage and timings
            try:
                client_left = await relay(opened, self._write_chunk, tail, job.path, job.request_id)
            finally:
                self.answer = Answer(SSE, bytes(tail))
                if tail.first_at is not None:
                    self.ttft = tail.first_at - job.started
                    self.lane.metrics.observe_ttft(job.path, self.ttft)
            if not client_left:
                self._write(b"0\r\n\r\n")
        return None

    def _head(self, status: int, headers: dict[str, str], job: Job, extra: dict[str, str] | None) -> bytes:
        """Status line and headers, without the blank line; the same headers as aiohttp's lane gives."""
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items())
        head += f"Date: {self.lane.date()}\r\nServer: {SERVER_SOFTWARE}\r\nX-Request-ID: {job.request_id}\r\n"
        if job.decision is not None or extra:
            more: dict[str, str] = dict(extra) if extra else {}
            if job.decision is not None:
                job.decision.apply(more)
            head += "".join(f"{name}: {value}\r\n" for name, value in more.items())
        return head.encode("latin-1")

    def _send(self, status: int, content_type: str, body: bytes, job: Job, extra: dict[str, str] | None) -> None:
        head = self._head(status, {"Content-Type": content_type, "Content-Length": str(len(body))}, job, extra)
        self._write(head + b"\r\n" + body)
        self.sent = status

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    async def _write_chunk(self, chunk: bytes) -> None:
        """One piece of a stream; waits while the client reads slower than the backend writes."""
        if self.transport is None:
            raise ConnectionResetError("the client left")
        self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        if self.write_paused:
            self.drained = self.lane.loop.create_future()
            await self.drained  # resume_writing() ends the wait; connection_lost() cancels this task

    def _next(self) -> None:
        """The answer is out: look at what came meanwhile, or wait for the next request."""
        if self.transport is None:
            return
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        if self.pending:
            data = b"".join(self.pending)
            self.pending, self.pending_size = [], 0
            self._take(data)
        else:
            self._touch()

    def _hold(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > _PAUSE_AT and not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    # --- idle connections ---------------------------------------------------------------------------------

    def _touch(self) -> None:
        self.last_active = self.lane.loop.time()
        if self.idle is None:
            self.idle = self.lane.loop.call_at(self.last_active + self.lane.settings.client_timeout, self._on_idle)

    def _on_idle(self) -> None:
        """CLIENT_TIMEOUT without a request: close, as aiohttp does with its keep-alive timeout."""
        self.idle = None
        if self.transport is None or self.task is not None:
            return  # busy: _next() re-arms the timer
        deadline = self.last_active + self.lane.settings.client_timeout
        if self.lane.loop.time() < deadline:
            self.idle = self.lane.loop.call_at(deadline, self._on_idle)
        else:
            self.transport.close()

    def abort(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()
