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

    `reset` has one meaning, on a 200 and on a 429 alike: the seconds until `remaining` next goes up by one, i.e.
    until the request that blocks the next one leaves the window. When allowed, that is the oldest request still
    counted (0 when none is); when refused, it is exactly the moment a request would pass, and `retry_after` is
    the same number rounded up, at least 1.

    A plain slotted class rather than a frozen dataclass: one is made per request, and a frozen dataclass's
    __init__ costs several times as much.
    """

    __slots__ = ("allowed", "limit", "remaining", "reset")

    def __init__(self, allowed: bool, limit: int, remaining: int, reset: float) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset = reset

    @property
    def retry_after(self) -> int:
        """Whole seconds until a request would pass: `reset` rounded up, at least 1 (0 when allowed)."""
        return 0 if self.allowed else max(1, math.ceil(self.reset))

    def apply(self, headers: MutableMapping[str, str]) -> None:
        """Set the rate-limit headers (and Retry-After when refused) on `headers`; both lanes use this."""
        headers["X-RateLimit-Limit"] = str(self.limit)
        headers["X-RateLimit-Remaining"] = str(self.remaining)
        if self.allowed:
            headers["X-RateLimit-Reset"] = str(math.ceil(self.reset))
        else:
            headers["X-RateLimit-Reset"] = headers["Retry-After"] = str(self.retry_after)


_FREE = Decision(True, 0, 0, 0.0)


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
            # A request passes once the oldest of the last `limit` accepted ones leaves the window (more than
            # `limit` are counted when the key's limit was lowered since).
            return Decision(False, limit, 0, hits[len(hits) - limit] + self.window - now)
        if consume:
            hits.append(now)
        reset = (hits[0] + self.window - now) if hits else 0.0
        return Decision(True, limit, limit - len(hits), reset)

    def add(self, key: str) -> None:
        self._recent(key, self.clock()).append(self.clock())

    def prune(self) -> None:
        """Forget keys with nothing in the window (bounded memory for per-address tracking)."""
        now = self.clock()
        for key in [k for k, hits in self._hits.items() if not self._recent(k, now)]:
            del self._hits[key]
