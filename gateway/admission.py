"""Admission control for generation routes: at most `capacity` backend slots held, the rest wait in a FIFO queue
(bounded by MAX_QUEUE_SIZE, 0 = unbounded) for at most QUEUE_TIMEOUT seconds.

A request holds `weight` slots: 1, or n for a request that generates n completions side by side
(lifecycle.request_rules.slots_needed, which also bounds n by the capacity).

Invariants:
1. `active` counts slots held. Freed slots go to the waiters in order: the oldest waiter is granted its slots as
   soon as enough are free, and nobody behind it jumps the queue, even one that would fit.
2. A waiter that leaves (its client disconnected, so its task was cancelled, or it timed out) is removed at once;
   if its slots had already been granted, they are passed on.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class Admission:
    def __init__(self, capacity: int, max_queue: int = 0, timeout: float = 60.0) -> None:
        self.capacity = capacity
        self.max_queue = max_queue
        self.timeout = timeout
        self.active = 0
        self._waiters: deque[tuple[asyncio.Future[None], int]] = deque()

    @property
    def depth(self) -> int:
        return len(self._waiters)

    @property
    def saturated(self) -> bool:
        """Every slot is held: a new request waits in the queue (or is refused when it is full)."""
        return self.active >= self.capacity

    async def acquire(self, weight: int = 1) -> float:
        """Wait for `weight` slots; returns the seconds waited. Raises QueueFull or QueueTimeout."""
        if self.active + weight <= self.capacity and not self._waiters:
            self.active += weight
            return 0.0
        if self.max_queue and len(self._waiters) >= self.max_queue:
            raise QueueFull
        started = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (waiter, weight)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                if isinstance(exc, TimeoutError):
                    return time.monotonic() - started  # the slots arrived together with the deadline: keep them
                self.release(weight)  # we were granted slots but are leaving: pass them on
            else:
                waiter.cancel()
                self._waiters.remove(entry)
                self._grant()  # a heavy waiter that leaves may let lighter ones behind it in
            if isinstance(exc, TimeoutError):
                raise QueueTimeout from None
            raise
        return time.monotonic() - started

    def release(self, weight: int = 1) -> None:
        self.active -= weight
        self._grant()

    def _grant(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter, weight = waiters[0]
            if waiter.done():
                waiters.popleft()
                continue
            if self.active + weight > self.capacity:
                return
            waiters.popleft()
            self.active += weight
            waiter.set_result(None)


class Admissions:
    """The slots and queue of each model: one Admission for a single model, one per model id with several
    (MODELS), so MAX_CONCURRENT_REQUESTS and the queue hold per model. Ids come from the served ModelSet only, so
    there are as many as models."""

    def __init__(self, capacity: int, max_queue: int = 0, timeout: float = 60.0) -> None:
        self.capacity, self.max_queue, self.timeout = capacity, max_queue, timeout
        self.default = Admission(capacity, max_queue, timeout)
        self.per_model: dict[str, Admission] = {}

    def of(self, model: str | None) -> Admission:
        if model is None:
            return self.default
        admission = self.per_model.get(model)
        if admission is None:
            admission = self.per_model[model] = Admission(self.capacity, self.max_queue, self.timeout)
        return admission

    def _all(self) -> list[Admission]:
        return [self.default, *self.per_model.values()]

    @property
    def depth(self) -> int:
        return sum(a.depth for a in self._all())

    @property
    def active(self) -> int:
        return sum(a.active for a in self._all())

    @property
    def saturated(self) -> bool:
        """Some model's slots are all held: its next request waits."""
        return any(a.saturated for a in self._all())
