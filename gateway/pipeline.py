"""The one exchange pipeline of both HTTP lanes: admit -> upstream -> relay -> record.

A lane (gateway.proxy for aiohttp's, gateway.fastlane for the fast lane) is a wire adapter: it decides whether a
request is its to take (the aiohttp lane takes every request; the fast lane only plain ones, see
gateway.fastlane.decide), authenticates it with gateway.auth.verdict, checks its body with
lifecycle.request_rules, builds an Exchange and hands it to Pipeline.run() with a Wire that writes the answer its
way. Everything after that is decided here, once:

- admission: the request waits for its slots (gateway.admission), or gets the queue's 503;
- upstream: one whole answer, or an event stream, from llama-server (lifecycle.upstream), or the 502/503/504 that
  stands for what went wrong (the backend's failure is classified in one place, `backend_failed`);
- relay: events passed on as they arrive; a failure after the stream started is an SSE error event; a client
  that leaves closes the upstream request, so llama-server stops generating;
- record: stats, metrics, time to first token, token usage and the access-log line (gateway.observe), in
  `record()`, which the lanes call for every request they answered.

Per-request state lives in the Exchange, never on a connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple, Protocol

from gateway import models as listing
from gateway.admission import Admissions, QueueFull, QueueTimeout
from gateway.auth import Admitted, finished
from gateway.errors import error_body, shaped, sse_error_event
from gateway.guard import Guard
from gateway.metrics import Metrics
from gateway.observe import JSON, SSE, Answer, Observer, answer_usage
from gateway.ratelimit import Decision
from gateway.routes import counted
from gateway.stats import Stats
from gateway.usage import StreamTail
from lifecycle.backend import Backend, Failure
from lifecycle.router import ModelLoadFailed
from lifecycle.routes import feature_missing, route_of, shape_of
from lifecycle.settings import Settings
from lifecycle.upstream import (
    Reply,
    Stream,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
)

log = logging.getLogger("gateway.pipeline")

RETRY_AFTER_LOADING = "5"
JSON_TYPE = "application/json"
# Response headers we set ourselves; llama-server's CORS headers never reach the client.
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(slots=True)
class Exchange:
    """One request, whichever lane it came by: what was decided for it and what became of it."""

    started: float  # time.monotonic() at arrival
    method: str
    path: str
    request_id: str
    key_id: str | None = None  # None until a key is known ("anonymous" with AUTH_ENABLED=false)
    decision: Decision | None = None  # the rate limit's, for the X-RateLimit-* headers
    body: bytes | None = None  # what goes to llama-server; None for GET
    stream: bool = False
    slots: int = 1  # backend slots it holds while it runs (n completions side by side)
    model: str | None = None  # with several models (MODELS): the id of the one it is for
    caller: Admitted | None = None  # the auth verdict that let it in: its scopes, budgets, concurrency, admin
    status: int = 0  # the status whose headers went out; 0 until then
    rejected: str | None = None  # why the gateway refused it (gateway.metrics.REJECTION_REASONS)
    ttft: float | None = None  # seconds to the first event of a stream
    answer: Answer | None = None  # where its token usage is read from, in the batch


class Refusal(NamedTuple):
    """An answer the gateway gives itself instead of llama-server's."""

    status: int
    message: str
    code: str | None = None
    headers: dict[str, str] | None = None
    reason: str | None = None  # for the metrics, when it is a rejection rather than a backend failure

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code)


class Wire(Protocol):
    """How a lane writes an answer. `send` is a whole answer; a stream is open(), write()*, close()."""

    def send(self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None) -> None: ...

    async def open(self, status: int) -> None: ...

    async def write(self, chunk: bytes) -> None:
        """Raises ConnectionError once the client has gone."""

    async def close(self) -> None: ...


def unavailable(backend_state: str) -> Refusal:
    return Refusal(503, f"the model backend is {backend_state}; retry shortly", "backend_unavailable",
                   {"Retry-After": RETRY_AFTER_LOADING})


class Pipeline:
    """One per app, built once its upstream client exists (gateway.app's cleanup context)."""

    def __init__(self, settings: Settings, backend: Backend, upstream: Upstream, admission: Admissions,
                 metrics: Metrics, stats: Stats, observer: Observer, guard: Guard) -> None:
        self.settings, self.backend, self.upstream = settings, backend, upstream
        self.admission, self.metrics, self.stats, self.observer = admission, metrics, stats, observer
        self.guard = guard
        self.queue_retry_after = {"Retry-After": str(max(1, round(self.settings.queue_timeout / 4)))}

    # --- begin and record: every request a lane answers ---------------------------------------------------------

    def begin(self, ex: Exchange) -> None:
        if counted(ex.path):
            self.stats.begin()

    def record(self, ex: Exchange, status: int) -> None:
        """The request is over (answered, refused, failed or abandoned with `status`): count, measure, log."""
        if counted(ex.path):
            self.stats.end(status)
        spend = False
        if ex.caller is not None:  # a stream's tokens count at once; a whole answer's in the batch
            spend = finished(self.guard, ex.caller, (lambda: _spent(ex)) if ex.stream else None)
        self.observer.record(ex.path, ex.method, status, ex.key_id, time.monotonic() - ex.started, ex.request_id,
                             ex.rejected, ex.ttft, ex.answer, ex.model, spend)

    def names(self, model: str | None) -> tuple[str, ...]:
        """The names a key's `models=` is matched against for a request's model (`model`: its id with several
        models; None with one): the id, the file name and the aliases."""
        if model is not None and (models := self.backend.models) is not None:
            served = models.get(model)
            if served is not None:
                return served.names
            return (model,)
        return _one_model_names(self.backend.model_id)  # the file name of the one model

    # --- the exchange --------------------------------------------------------------------------------------------

    async def run(self, ex: Exchange, wire: Wire) -> None:
        """Answer `ex` through `wire`: queue for its slots (requests with a body), then llama-server's answer."""
        if not self.backend.ready:
            self.refuse(ex, wire, unavailable(self.backend.state.value))
            return
        route = route_of(ex.path)
        if route is not None and (missing := feature_missing(route, self.settings)) is not None:
            self.refuse(ex, wire, Refusal(501, missing, "feature_not_enabled"))
            return
        if ex.body is None:
            self.answer(ex, wire, await self.get(ex))
            return
        admission = self.admission.of(ex.model)
        try:
            waited = await admission.acquire(ex.slots)
        except (QueueFull, QueueTimeout) as exc:
            self.refuse(ex, wire, self.queue_refusal(isinstance(exc, QueueFull)))
            return
        self.metrics.observe_queue_wait(waited)
        headers = {"Content-Type": JSON_TYPE, "X-Request-ID": ex.request_id}
        try:
            if ex.model is not None:
                # A model that is not loaded: the request goes on waiting, within the queue's deadline, while the
                # router loads it; never failed early.
                refusal = await self.model_ready(ex.model, ex.started + self.settings.queue_timeout)
                if refusal is not None:
                    self.refuse(ex, wire, refusal)
                    return
            if ex.stream:
                opened = await self.open_events(ex.path, ex.body, headers, ex.request_id)
                if isinstance(opened, Stream):
                    async with opened:
                        await self._relay(ex, wire, opened)
                    return
                self.answer(ex, wire, opened)
            else:
                reply = await self.whole(ex.method, ex.path, ex.body, headers, ex.request_id)
                if isinstance(reply, Reply) and reply.status == 200:
                    ex.answer = Answer(JSON, reply.body)  # its tokens are counted in the batch (gateway.observe)
                self.answer(ex, wire, reply)
        finally:
            admission.release(ex.slots)

    def queue_refusal(self, full: bool) -> Refusal:
        self.stats.queue_rejections += 1
        return Refusal(
            503, "the request queue is full; retry shortly" if full
            else "no backend slot became free in time; retry shortly",
            "queue_full" if full else "queue_timeout", self.queue_retry_after,
            "queue_full" if full else "queue_timeout")

    async def model_ready(self, model: str, deadline: float) -> Refusal | None:
        """None once `model` is loaded (the router loads it on request); else the 503 to give."""
        router = self.backend.router
        assert router is not None  # ex.model is set with several models only
        try:
            if await router.wait_ready(model, deadline):
                return None
        except ModelLoadFailed as exc:
            return Refusal(503, str(exc), "model_load_failed", {"Retry-After": RETRY_AFTER_LOADING})
        except UpstreamError as exc:
            log.warning("router: the status of %s is unknown: %s", model, exc)
            return unavailable("not answering about its models")
        self.stats.queue_rejections += 1
        return Refusal(503, f"the model {model} is still loading after QUEUE_TIMEOUT "
                            f"({self.settings.queue_timeout:g}s); retry shortly", "queue_timeout",
                       self.queue_retry_after, "queue_timeout")

    async def get(self, ex: Exchange) -> Reply | Refusal:
        """A GET route: the model list (the gateway's own with several models, or one model of it), or
        llama-server's answer."""
        if ex.path == "/v1/models":
            return await listing.model_list(self, ex)
        if ex.path.startswith(listing.MODEL_PREFIX):
            return await listing.one_model(self, ex)
        return await self.whole(ex.method, ex.path, None, {"X-Request-ID": ex.request_id}, ex.request_id)

    def refuse(self, ex: Exchange, wire: Wire, refusal: Refusal) -> None:
        if refusal.reason is not None:
            ex.rejected = refusal.reason
        wire.send(refusal.status, JSON_TYPE, shaped(shape_of(ex.path), refusal.status, refusal.body()),
                  refusal.headers)
        ex.status = refusal.status

    def answer(self, ex: Exchange, wire: Wire, reply: Reply | Refusal) -> None:
        """Send llama-server's whole answer, or the refusal that stands for it."""
        if isinstance(reply, Refusal):
            self.refuse(ex, wire, reply)
            return
        body = reply.body if reply.status < 400 else shaped(shape_of(ex.path), reply.status, reply.body)
        wire.send(reply.status, reply.content_type or JSON_TYPE, body, None)
        ex.status = reply.status

    # --- upstream ------------------------------------------------------------------------------------------------

    async def whole(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None, request_id: str
    ) -> Reply | Refusal:
        """One whole answer from llama-server, or the error to give instead (502, 503, 504)."""
        timeout = self.settings.request_timeout
        try:
            return await self.upstream.request(method, path, body=body, headers=headers, timeout=timeout)
        except UpstreamTimeout:
            log.warning("backend request %s %s timed out after %gs (request_id=%s)", method, path, timeout,
                        request_id)
            return Refusal(504, f"the model backend did not answer within {timeout:g}s (REQUEST_TIMEOUT)")
        except UpstreamError as exc:
            return await self.backend_failed(method, path, request_id, exc)

    async def open_events(
        self, path: str, body: bytes, headers: dict[str, str], request_id: str
    ) -> Stream | Reply | Refusal:
        """Start a streamed answer: the event stream, to be closed by the caller; or llama-server's whole answer
        when it refused before streaming (e.g. a prompt over the context); or the error to give instead."""
        try:
            resp = await self.upstream.open_stream("POST", path, body=body, headers=headers)
        except UpstreamTimeout:
            log.warning("backend stream %s did not start within STREAM_IDLE_TIMEOUT (request_id=%s)", path,
                        request_id)
            return Refusal(504, "the model backend did not start answering in time (STREAM_IDLE_TIMEOUT)")
        except UpstreamError as exc:
            return await self.backend_failed("POST", path, request_id, exc)
        if resp.content_type.startswith("text/event-stream"):
            return resp
        async with resp:
            try:
                return Reply(resp.status, resp.content_type, await resp.read_all(self.settings.max_response_size))
            except UpstreamError as exc:
                return await self.backend_failed("POST", path, request_id, exc)

    async def backend_failed(self, method: str, path: str, request_id: str, exc: UpstreamError) -> Refusal:
        """The answer to a failed upstream request, as lifecycle.backend.Backend.classify reads the failure: 503
        while the backend restarts (nothing reached it, or it died under the request), 504 when it did not answer
        in time, 502 otherwise."""
        log.warning("backend request %s %s failed: %s (request_id=%s)", method, path, exc, request_id)
        failure = await self.backend.classify(exc, self.backend.pid)
        if failure is Failure.TOO_LARGE:
            return Refusal(502, f"the model backend's answer is larger than {self.settings.max_response_size} "
                                "bytes (MAX_RESPONSE_SIZE)", "backend_answer_too_large")
        if failure is Failure.RESTARTING:
            return Refusal(503, "the model backend is restarting; retry shortly", "backend_unavailable",
                           {"Retry-After": RETRY_AFTER_LOADING})
        if failure is Failure.TIMEOUT:
            return Refusal(504, "the model backend did not answer in time")
        return Refusal(502, "the model backend did not answer", "backend_error")

    # --- relay ---------------------------------------------------------------------------------------------------

    async def _relay(self, ex: Exchange, wire: Wire, resp: Stream) -> None:
        await wire.open(resp.status)
        ex.status = resp.status
        tail = StreamTail()  # the last few KB, where llama-server puts usage and timings
        try:
            client_left = await relay(resp, wire, tail, ex.path, ex.request_id, shape_of(ex.path))
        finally:
            # Also when cancelled: a client that closes as soon as it reads [DONE] cancels its request.
            ex.answer = Answer(SSE, bytes(tail), tail.events)
            if tail.first_at is not None:
                ex.ttft = tail.first_at - ex.started
                self.metrics.observe_ttft(ex.path, ex.ttft, ex.model or self.backend.model_id)
        if not client_left:
            await wire.close()


@lru_cache(maxsize=8)
def _one_model_names(file_name: str | None) -> tuple[str, ...]:
    if file_name is None:
        return ("",)
    return (file_name.removesuffix(".gguf"), file_name) if file_name.endswith(".gguf") else (file_name,)


def _spent(ex: Exchange) -> int:
    """The tokens of a stream's answer, read now (for a token budget) and kept for the batch, which reads no more."""
    usage = answer_usage(ex.answer)
    if usage is None:
        return 0
    if ex.answer is not None:
        ex.answer = ex.answer._replace(usage=usage)
    return usage.prompt_tokens + usage.completion_tokens


async def relay(resp: Stream, wire: Wire, tail: StreamTail, path: str, request_id: str,
                shape: str = "openai") -> bool:
    """Pass the backend's events on as they arrive; True when the client left.

    tail.first_at is when the first piece arrived (monotonic), for time-to-first-token."""
    chunk = b"\n\n"
    write = wire.write
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
            chunk, failed = sse_error_event(message, "backend_timeout" if timed_out else "backend_error", shape), True
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
