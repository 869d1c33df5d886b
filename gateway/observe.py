"""Per-request bookkeeping, done in batches: metrics series, token counts from the answer, access-log lines.

The request path only appends one tuple. The work itself runs for up to BATCH requests at a time: when the batch is
full, FLUSH_INTERVAL seconds after the first request of a batch, before every /metrics scrape, and on shutdown. The
work is the same; done for many requests in a row, its code and data stay in the CPU's caches. Measured on the
benchmark machine: about 18 us less gateway CPU per request at 32 concurrent clients, about 15 % more requests/s
(bench/RESULTS.md). Metrics are at most FLUSH_INTERVAL behind, and never behind a scrape.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from gateway.accesslog import AccessLog, AccessRecord
from gateway.ledger import Ledger
from gateway.metrics import Metrics
from gateway.routes import JSON_ROUTES, counted
from gateway.usage import Usage, usage_from_json, usage_from_stream

log = logging.getLogger("gateway.observe")

BATCH = 256
FLUSH_INTERVAL = 0.1  # seconds

JSON = "json"  # the answer's body: a whole OpenAI response
SSE = "sse"  # the answer's last bytes: the tail of an event stream


class Answer(NamedTuple):
    """Where a request's token usage is read from, later, in the batch."""

    kind: str  # JSON or SSE
    data: bytes
    events: int = 0  # SSE: the `data:` events relayed (StreamTail.events), for a stream cut short
    usage: Usage | None = None  # already read (a key with a token budget spends it at once: gateway.pipeline)


class Observed(NamedTuple):
    path: str
    method: str
    status: int
    key_id: str | None
    duration: float  # seconds
    started: float  # wall clock (time.time()) at arrival
    request_id: str
    rejected: str | None
    ttft: float | None
    answer: Answer | None
    model: str | None = None
    spend: bool = False  # its tokens count against its key's token budget (Guard.spend), here in the batch


_MODEL_ROUTES = frozenset(JSON_ROUTES)  # the routes whose requests are for a model (the one served, with one)


class Observer:
    """Owned by the app; record() from the event loop, flush() from the event loop (or a test).

    With a `ledger` (gateway.ledger, USAGE_LEDGER), every API request with a key id is added to it, in the batch."""

    def __init__(self, metrics: Metrics, access_log: AccessLog | None, model_id: Callable[[], str | None],
                 ledger: Ledger | None = None, spend: Callable[[str, int], None] | None = None) -> None:
        self.metrics = metrics
        self.spend = spend  # gateway.guard.Guard.spend: the token budgets of whole answers
        self.access_log = access_log
        self.model_id = model_id
        self.ledger = ledger
        self._pending: list[Observed] = []
        self._timer: asyncio.TimerHandle | None = None

    def record(
        self, path: str, method: str, status: int, key_id: str | None, duration: float, request_id: str,
        rejected: str | None, ttft: float | None, answer: Answer | None, model: str | None = None,
        spend: bool = False,
    ) -> None:
        """`model`: the request's model with several models; else the one model_id() serves. `spend`: its tokens
        count against its key's token budget (gateway.auth.finished)."""
        pending = self._pending
        pending.append(Observed(path, method, status, key_id, duration, time.time() - duration, request_id,
                                rejected, ttft, answer, model, spend))
        if len(pending) >= BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        metrics, access_log, ledger, served = self.metrics, self.access_log, self.ledger, self.model_id()
        for item in batch:
            try:
                model = item.model or served
                usage = answer_usage(item.answer)
                if item.spend and usage is not None and self.spend is not None and item.key_id is not None:
                    self.spend(item.key_id, usage.prompt_tokens + usage.completion_tokens)
                if usage is not None:
                    metrics.observe_tokens(item.key_id, model, usage.prompt_tokens, usage.completion_tokens,
                                           usage.generation_seconds, usage.cached_tokens)
                if ledger is not None and item.key_id is not None and counted(item.path):
                    _account(ledger, item, usage, served)
                metrics.observe_request(item.path, item.status, item.key_id, item.duration, model)
                if item.rejected is not None:
                    metrics.reject(item.rejected)
                if access_log is not None:
                    access_log.write(AccessRecord(
                        time=item.started, request_id=item.request_id, key_id=item.key_id, method=item.method,
                        path=item.path, status=item.status, duration_ms=item.duration * 1000,
                        ttft_ms=None if item.ttft is None else item.ttft * 1000,
                        prompt_tokens=None if usage is None else usage.prompt_tokens,
                        completion_tokens=None if usage is None else usage.completion_tokens,
                    ))
            except Exception:  # one odd request must not cost the rest of the batch
                log.exception("cannot account for request %s", item.request_id)


def _account(ledger: Ledger, item: Observed, usage: Usage | None, served: str | None) -> None:
    """One API request in the usage ledger. Its model: the request's, else the one served for a route that takes a
    model; "" for a request for none (GET /v1/models, a refusal before the body named a model)."""
    model = item.model or (served or "" if item.path in _MODEL_ROUTES else "")
    if usage is None:
        ledger.add(item.key_id or "", model, item.started, error=item.status >= 400, ttft=item.ttft)
    else:
        ledger.add(item.key_id or "", model, item.started, usage.prompt_tokens, usage.completion_tokens,
                   usage.cached_tokens, item.status >= 400, item.ttft)


def answer_usage(answer: Answer | None) -> Usage | None:
    """The token usage of a recorded answer (None without one, or when it says none)."""
    if answer is None:
        return None
    if answer.usage is not None:
        return answer.usage
    return usage_from_json(answer.data) if answer.kind == JSON else usage_from_stream(answer.data, answer.events)
