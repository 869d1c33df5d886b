"""Sliding-window rate limits: exact at the window edges, and a rejected request uses up nothing.

Each key keeps the times of its accepted requests within the last `window` seconds (at most `limit` of them),
so a request is allowed exactly when fewer than `limit` were accepted in the `window` seconds before it.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, MutableMapping


class Decision:
    """The outcome of one check: allowed, and the numbers behind the X-RateLimit-* headers.

    A plain slotted class rather than a frozen dataclass: one is made per request, and a frozen dataclass's
    __init__ costs several times as much.
    """

    __slots__ = ("allowed", "limit", "remaining", "reset", "retry_after")

    def __init__(self, allowed: bool, limit: int, remaining: int, reset: float, retry_after: int) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset = reset  # seconds until the window has room for `limit` again
        self.retry_after = retry_after  # whole seconds until a request would pass (0 when allowed)

    def apply(self, headers: MutableMapping[str, str]) -> None:
        """Set the rate-limit headers (and Retry-After when refused) on `headers`."""
        headers["X-RateLimit-Limit"] = str(self.limit)
        headers["X-RateLimit-Remaining"] = str(self.remaining)
        headers["X-RateLimit-Reset"] = str(math.ceil(self.reset))
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)


_FREE = Decision(True, 0, 0, 0.0, 0)


class SlidingWindow:
    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._hits: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float]:
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = deque()
        edge = now - self.window
        while hits and hits[0] <= edge:
            hits.popleft()
        return hits

    def check(self, key: str, limit: int, consume: bool = True) -> Decision:
        if not consume and key not in self._hits:
            return _FREE
        now = self.clock()
        hits = self._recent(key, now)
        if len(hits) >= limit:
            # The request passes once the oldest of the last `limit` accepted ones leaves the window.
            wait = hits[len(hits) - limit] + self.window - now
            return Decision(False, limit, 0, hits[-1] + self.window - now, max(1, math.ceil(wait)))
        if consume:
            hits.append(now)
        remaining = limit - len(hits)
        reset = (hits[0] + self.window - now) if hits else 0.0
        return Decision(True, limit, remaining, reset, 0)

    def add(self, key: str) -> None:
        self._recent(key, self.clock()).append(self.clock())

    def prune(self) -> None:
        """Forget keys with nothing in the window (bounded memory for per-address tracking)."""
        now = self.clock()
        for key in [k for k, hits in self._hits.items() if not self._recent(k, now)]:
            del self._hits[key]
