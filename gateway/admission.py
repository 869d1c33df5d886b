"""Admission control for generation routes: at most `capacity` requests at the backend, the rest wait in a FIFO
queue (bounded by MAX_QUEUE_SIZE, 0 = unbounded) for at most QUEUE_TIMEOUT seconds.

Invariants:
1. `active` counts slots held; a slot freed while someone waits passes straight to the oldest waiter (its future
   is resolved), so `active` does not change and nobody can jump the queue.
2. A waiter that leaves (its client disconnected, so its task was cancelled, or it timed out) is removed at once;
   if a slot had already been passed to it, the slot is passed on.
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
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def depth(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited. Raises QueueFull or QueueTimeout."""
        if self.active < self.capacity and not self._waiters:
            self.active += 1
            return 0.0
        if self.max_queue and len(self._waiters) >= self.max_queue:
            raise QueueFull
        started = time.monotonic()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled():
                if isinstance(exc, TimeoutError):
                    return time.monotonic() - started  # the slot arrived together with the deadline: keep it
                self.release()  # we were handed a slot but are leaving: pass it on
            else:
                waiter.cancel()
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise QueueTimeout from None
            raise
        return time.monotonic() - started

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the oldest waiter; `active` is unchanged
                return
        self.active -= 1

