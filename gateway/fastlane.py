"""The fast lane: plain API calls answered without aiohttp's per-request machinery; everything else goes to aiohttp.

PORT is served by this asyncio protocol, with HTTP parsed by httptools. A request takes the fast lane only when it
is the common case, which is decided before anything is done for it:
1. it arrived whole and alone (nothing pipelined behind it) within PIECES_WAIT of its first byte (most clients
   write the head and the body apart: the fast lane waits for the rest), as HTTP/1.1 keep-alive (no
   `Connection: close`), with exactly one Host header and a Content-Length body (none for GET), within the header
   limits and MAX_REQUEST_BODY_SIZE;
2. it is a POST to a route of lifecycle.routes (chat, completions, embeddings, responses, messages, rerank, the
   llama.cpp routes), or GET /v1/models, with no query string, and no Origin, Expect, Upgrade or
   Transfer-Encoding header;
3. the backend is ready and the gateway is not draining;
4. with AUTH_ENABLED, its key is known and unexpired, its address is not blocked for failed keys (or the key is
   one that address was using), and the route is in the key's route groups (before the body is parsed);
5. its body passes lifecycle.request_rules (strict JSON, capped fields), the same functions aiohttp's lane calls,
   and its model is one the key may use (gateway.scopes);
6. its token budgets, max_concurrent and rate limit let it through (gateway.auth.charge: the last check, the
   only one that uses anything up; with REDIS_URL, gateway.auth.judge on the shared windows, awaited: a refusal
   then goes to aiohttp after the round trip, with the bytes that came meanwhile).
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
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from gateway.auth import Admitted, charge, credential, judge, verdict
from gateway.connections import GatewayServer, WriteStall
from gateway.errors import CLIENT_CLOSED, INTERNAL_ERROR, error_body
from gateway.keyfile import KeyEntry
from gateway.limits import body_too_large, header_problem
from gateway.pipeline import SSE_HEADERS, Exchange
from gateway.routes import GET_ROUTES, JSON_ROUTES
from gateway.scopes import model_refusal
from gateway.state import BACKEND, CONNECTIONS, DRAIN, GUARD, KEYS, LIMITS, PIPELINE, REQUEST_IDS, SETTINGS, SHARED
from lifecycle.request_rules import RequestRejected, admit_body

log = logging.getLogger("gateway.fastlane")

# Headers that send a request to aiohttp: browsers (CORS), 100-continue, protocol switches, chunked bodies.
_HAND_OVER = frozenset({b"origin", b"expect", b"upgrade", b"transfer-encoding", b"access-control-request-method"})
_PAUSE_AT = 1 << 20  # bytes of pipelined requests held while one is answered, before we stop reading
# A request that arrives in pieces (most HTTP clients write the headers and the body separately): how long the fast
# lane waits for the rest before handing what it has to aiohttp, and how much it holds meanwhile (past that,
# aiohttp's lane takes it and applies its own limits and timeouts).
PIECES_WAIT = 0.5
PIECES_HEAD = 16 << 10  # an unfinished head is waited for up to this size (a usual one is well under 2 KiB)
_REASONS = {s.value: s.phrase for s in HTTPStatus}


class Candidate(NamedTuple):
    """A request the fast lane may take, as decide() found it: what the later checks need."""

    method: str
    path: str
    authorization: str  # the header's value ("" when absent)
    request_id: str | None  # the X-Request-ID header's value
    body: bytes | None  # None for GET


class _Taken(NamedTuple):
    """A request past every check but the one that uses anything up (its key's limits): what its Exchange needs."""

    started: float
    candidate: Candidate
    body: bytes | None
    stream: bool
    slots: int
    model: str | None
    key: KeyEntry | None  # the caller's key, as verdict() found it


class LaneLimits(NamedTuple):
    """What decide() compares a request with."""

    post_routes: dict[bytes, str]
    get_routes: dict[bytes, str]
    max_headers: int
    max_line: int
    max_body: int


def decide(
    limits: LaneLimits, version: str, keep_alive: bool, method: bytes, url: bytes, headers: list[tuple[bytes, bytes]],
    body: list[bytes], open_for_traffic: bool,
) -> Candidate | str:
    """Take or hand over: the Candidate when the request is the fast lane's to take, else why not (a few words).

    Pure: it reads only its arguments. The checks that use something up (the rate limit) and the body's rules
    come after it (FastConnection._admit), through the functions aiohttp's lane calls too."""
    if version != "1.1" or not keep_alive:
        return "not HTTP/1.1 keep-alive"
    routes = limits.post_routes if method == b"POST" else limits.get_routes if method == b"GET" else None
    path = None if routes is None else routes.get(url)
    if path is None:
        return "not a fast-lane route"
    if not open_for_traffic:
        return "backend not ready or draining"
    problem = header_problem(headers, limits.max_headers, limits.max_line)
    if problem is not None:
        return problem  # aiohttp's lane gives the 431
    token = api_key = request_id = length = None
    hosts = 0
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"authorization":
            if token is not None:
                return "Authorization twice"  # aiohttp's lane decides which one counts
            token = value
        elif lowered == b"x-api-key":
            if api_key is not None:
                return "x-api-key twice"
            api_key = value
        elif lowered == b"x-request-id":
            if request_id is not None:
                return "X-Request-ID twice"
            request_id = value
        elif lowered == b"content-length":
            if length is not None:
                return "Content-Length twice"
            length = value
        elif lowered == b"host":
            hosts += 1
        elif lowered in _HAND_OVER:
            return f"{lowered.decode('latin-1')} header"
    if hosts != 1:
        return "not exactly one Host"  # HTTP/1.1 needs exactly one: aiohttp's lane refuses the rest
    try:
        auth = credential(token.decode("ascii") if token else "", api_key.decode("ascii") if api_key else "")
        rid = request_id.decode("ascii") if request_id else None
    except UnicodeDecodeError:
        return "a header that is not ASCII"
    if method == b"POST":
        raw = b"".join(body)
        if length is None or body_too_large(len(raw), limits.max_body):
            return "no Content-Length, or a body over MAX_REQUEST_BODY_SIZE"
        return Candidate("POST", path, auth, rid, raw)
    if body:
        return "a GET with a body"
    return Candidate("GET", path, auth, rid, None)


class FastLane:
    """The protocol factory for PORT; one per app. Holds what the hot path reads, looked up once, and the open
    fast-lane connections (closed at shutdown)."""

    def __init__(self, app: web.Application, server: GatewayServer, loop: asyncio.AbstractEventLoop) -> None:
        self.server = server  # aiohttp's protocol factory: takes the connections handed over
        self.loop = loop
        self.app = app
        self.settings = settings = app[SETTINGS]
        self.backend, self.drain, self.pipeline = app[BACKEND], app[DRAIN], app[PIPELINE]
        self.stats = self.pipeline.stats
        self.keys, self.guard, self.shared = app[KEYS], app[GUARD], app.get(SHARED)
        self.request_ids, self.body_limits, self.open = app[REQUEST_IDS], app[LIMITS], app[CONNECTIONS]
        self.limits = LaneLimits({path.encode(): path for path in JSON_ROUTES},
                                 {path.encode(): path for path in GET_ROUTES}, settings.max_headers,
                                 settings.max_header_line_size, settings.max_request_body_size)
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
        self.exchange: Exchange | None = None  # the request being answered (its state lives there)
        # the message being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._messages = 0
        self._complete = False
        self._keep_alive = False  # read when the headers are in: llhttp resets it once the message is complete
        self._headers_done = False
        self._started = 0.0
        self._pieces: list[bytes] | None = None  # the request so far, while the rest of it is awaited
        self._pieces_size = 0
        self._pieces_timer: asyncio.TimerHandle | None = None

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
        self._drop_pieces()
        if self.task is not None:
            self.task.cancel()  # the client left: leave the queue, or drop the upstream request

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return  # refused (MAX_CONNECTIONS)
        if self.task is not None or self.write_paused:
            self._hold(data)
            return
        if self._pieces is not None:
            self._feed(data)
        else:
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
        self._headers_done = True

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._complete = True

    # --- deciding -----------------------------------------------------------------------------------------

    def _take(self, data: bytes) -> None:
        """`data` starts a new request: answer it here, or hand it to aiohttp."""
        self._started = time.monotonic()
        self._url, self._headers, self._body, self._messages, self._complete = b"", [], [], 0, False
        self._keep_alive = self._headers_done = False
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """More of the request begun by _take: answer it once it is whole, wait for the rest of one that comes in
        pieces (at most PIECES_WAIT), or hand everything received since it began to aiohttp."""
        if self._pieces is not None:
            self._pieces.append(data)
            self._pieces_size += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_over(self._whole(data))
            return
        size = len(data) if self._pieces is None else self._pieces_size
        if not self._complete and self._messages == 1 and self._worth_waiting(size):
            if self._pieces is None:
                self._pieces, self._pieces_size = [data], len(data)
                self._pieces_timer = self.lane.loop.call_later(PIECES_WAIT, self._pieces_late)
            return
        whole = self._whole(data)
        try:
            ex = self._admit(self._started) if self._complete and self._messages == 1 else None
        except Exception:  # a bug here must not cost the request: aiohttp's lane answers it
            log.exception("the fast lane failed to look at a request; handing it to aiohttp")
            ex = None
        if ex is None:
            self._hand_over(whole)
        elif isinstance(ex, _Taken):
            self.task = self.lane.loop.create_task(self._judged(ex, whole))
        else:
            self.task = self.lane.loop.create_task(self._answer(ex))

    def _whole(self, data: bytes) -> bytes:
        """Every byte of the request since it began (`data` the last piece); no longer waiting for pieces."""
        whole = data if self._pieces is None else b"".join(self._pieces)
        self._drop_pieces()
        return whole

    def _worth_waiting(self, size: int) -> bool:
        """Whether the rest of an unfinished request is worth waiting for: it may still be the fast lane's. An
        unfinished head past PIECES_HEAD, a header that sends it to aiohttp (Expect: 100-continue, ...), another
        route or a body over MAX_REQUEST_BODY_SIZE does not wait: aiohttp's lane takes it, and its limits."""
        if not self._headers_done:
            return size <= PIECES_HEAD
        routes = self.lane.limits.post_routes if self.parser.get_method() == b"POST" else {}
        if self._url not in routes:
            return False
        length = None
        for name, value in self._headers:
            lowered = name.lower()
            if lowered in _HAND_OVER:
                return False
            if lowered == b"content-length":
                length = value
        return length is not None and length.isdigit() and not body_too_large(int(length), self.lane.limits.max_body)

    def _pieces_late(self) -> None:
        """The rest did not come within PIECES_WAIT: aiohttp's lane takes the request (and its timeouts)."""
        self._pieces_timer = None
        if self._pieces is not None and self.task is None:
            self._hand_over(self._whole(b""))

    def _drop_pieces(self) -> None:
        self._pieces, self._pieces_size = None, 0
        if self._pieces_timer is not None:
            self._pieces_timer.cancel()
            self._pieces_timer = None

    def _admit(self, started: float) -> Exchange | _Taken | None:
        """The exchange when the fast lane takes the request, else None (hand it over). Nothing is used up unless
        it returns one.

        decide() first (framing, headers, route: pure), then the key (gateway.auth.verdict, only looking: a
        caller without a key costs no JSON parsing), then the body's rules (lifecycle.request_rules), and the rate
        limit last (auth.charge with the limit verdict found), the one check that uses anything up. Every refusal is
        aiohttp's lane's to give, so each has one implementation."""
        lane, parser = self.lane, self.parser
        candidate = decide(lane.limits, parser.get_http_version(), self._keep_alive, parser.get_method(), self._url,
                           self._headers, self._body, lane.backend.ready and not lane.drain.draining)
        if isinstance(candidate, str):
            return None
        looked = verdict(lane.keys.ring, lane.guard, lane.settings, candidate.authorization, self.client,
                         candidate.path, consume=False)
        if not isinstance(looked, Admitted):
            return None
        body: bytes | None = None
        stream, slots, model = False, 1, None
        if candidate.body is not None:
            try:
                parsed, body, slots, model = admit_body(candidate.body, lane.body_limits, candidate.path)
            except RequestRejected:
                return None  # aiohttp's lane gives the 400 (or the 404 of an unknown model)
            stream = parsed.get("stream") is True
            key = looked.entry
            if key is not None and key.models and model_refusal(key, lane.pipeline.names(model)) is not None:
                return None  # aiohttp's lane gives the 403
        taken = _Taken(started, candidate, body, stream, slots, model, looked.entry)
        if looked.entry is not None and lane.shared is not None:
            return taken  # the shared windows' judge (gateway.auth.judge) is awaited by _judged()
        admitted = looked if looked.entry is None else charge(lane.guard, looked, self.client)
        if not isinstance(admitted, Admitted):
            return None
        return self._exchange(taken, admitted)

    def _exchange(self, taken: _Taken, admitted: Admitted) -> Exchange:
        c = taken.candidate
        return Exchange(taken.started, c.method, c.path, self.lane.request_ids(c.request_id), admitted.key_id,
                        admitted.decision, taken.body, taken.stream, taken.slots, model=taken.model, caller=admitted)

    async def _judged(self, taken: _Taken, whole: bytes) -> None:
        """REDIS_URL: the key's limits on the shared windows (one round trip), then the answer; a refusal is handed
        to aiohttp's lane, with everything that came meanwhile, as any other refusal (it judges again, and gives
        it). Nothing was counted against the caller for it: judge(consume=False)."""
        lane = self.lane
        admitted = await judge(lane.keys.ring, lane.guard, lane.shared, lane.settings,  # type: ignore[arg-type]
                               taken.candidate.authorization, self.client, taken.candidate.path, consume=False,
                               identified=taken.key)
        if isinstance(admitted, Admitted):
            await self._answer(self._exchange(taken, admitted))
            return
        self.task = None
        held, self.pending, self.pending_size = b"".join(self.pending), [], 0
        self._hand_over(whole + held)

    def _hand_over(self, data: bytes) -> None:
        """From now on aiohttp's server owns this connection; `data` is everything since the request began."""
        transport = self.transport
        self.lane.connections.discard(self)
        self._drop_pieces()
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

    async def _answer(self, ex: Exchange) -> None:
        pipeline = self.lane.pipeline
        self.exchange = ex
        status = 500
        pipeline.begin(ex)
        pipeline.stats.fast_lane += 1
        try:
            await pipeline.run(ex, self)
            status = ex.status
        except asyncio.CancelledError:
            status = CLIENT_CLOSED  # the client left before its answer (a stream counts with its own status)
            raise
        except Exception:
            log.exception("unexpected error on %s %s (request_id=%s)", ex.method, ex.path, ex.request_id)
            if ex.status:  # a stream under way: all that can be done is to drop the connection, as aiohttp does
                if self.transport is not None:
                    self.transport.close()
            else:
                self.send(500, "application/json",
                          error_body(500, INTERNAL_ERROR, "internal_error"), None)
        finally:
            pipeline.record(ex, ex.status or status)  # cancelled once the answer started: the status it sent
            self.task = None
            self.exchange = None
        if not self.write_paused:
            self._next()

    # --- gateway.pipeline.Wire: writing the answer ----------------------------------------------------------

    def send(self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        head = self._head(status, {"Content-Type": content_type, "Content-Length": str(len(body))}, headers)
        self._write(head + b"\r\n" + body)  # the pipeline notes the status on the exchange

    async def open(self, status: int) -> None:
        """The head of an event stream, in chunked transfer encoding."""
        self._write(self._head(status, SSE_HEADERS, None) + b"Transfer-Encoding: chunked\r\n\r\n")

    async def write(self, chunk: bytes) -> None:
        """One piece of a stream; waits while the client reads slower than the backend writes."""
        if self.transport is None:
            raise ConnectionResetError("the client left")
        self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        if self.write_paused:
            self.drained = self.lane.loop.create_future()
            await self.drained  # resume_writing() ends the wait; connection_lost() cancels this task

    async def close(self) -> None:
        self._write(b"0\r\n\r\n")

    def _head(self, status: int, headers: Mapping[str, str], extra: Mapping[str, str] | None) -> bytes:
        """Status line and headers, without the blank line; the same headers as aiohttp's lane gives."""
        ex = self.exchange
        assert ex is not None
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n" + "".join(
            f"{name}: {value}\r\n" for name, value in headers.items())
        head += f"Date: {self.lane.date()}\r\nServer: {SERVER_SOFTWARE}\r\nX-Request-ID: {ex.request_id}\r\n"
        if ex.decision is not None or extra:
            more: dict[str, str] = dict(extra) if extra else {}
            if ex.decision is not None:
                ex.decision.apply(more)
            head += "".join(f"{name}: {value}\r\n" for name, value in more.items())
        return head.encode("latin-1")

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

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
        if self.transport is None or self.task is not None or self._pieces is not None:
            return  # busy (or a request coming in pieces, which PIECES_WAIT bounds): _next() re-arms the timer
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
