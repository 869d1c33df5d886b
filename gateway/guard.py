"""The per-key and per-address state the auth rule (gateway.auth.verdict and charge) reads and uses up.

- `limiter`: requests per minute per key (gateway.ratelimit.SlidingWindow);
- `minute_tokens`, `day_tokens`: tokens per key over the last 60 s and 24 h (TokenWindow), for the keys file's
  `tokens_per_minute` and `tokens_per_day`;
- `in_flight`: requests of each key under way, for `max_concurrent`;
- `failures`: failed keys per client address, and `good`: the keys each address used successfully lately, so an
  address over its failure limit is refused new guesses while the keys it was already using go on working.

One per gateway process, owned by the app. With REDIS_URL the windows are shared by every replica
(gateway.shared); these are kept current as well and are the ones used while Redis is down, and `revoked` is this
replica's copy of the shared revoked set (keys removed or rotated away on any replica).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from gateway.ratelimit import SlidingWindow
from lifecycle.settings import Settings

GOOD_FOR = 3600.0  # seconds a key used successfully from an address counts as that address's own
GOOD_REFRESH = 60.0  # how often a key's last success from an address is noted again (GOOD_FOR is exact to this)
MAX_GOOD_PER_ADDRESS = 64
MAX_GOOD_ADDRESSES = 100_000


class TokenWindow:
    """Tokens spent per key over a sliding window, in buckets of `bucket` seconds (exact to a bucket)."""

    def __init__(self, window: float, bucket: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window, self.bucket, self.clock = window, bucket, clock
        self._spent: dict[str, deque[list[float]]] = {}  # key -> [[bucket start, tokens], ...] oldest first
        self._sums: dict[str, float] = {}

    def _recent(self, key: str, now: float) -> deque[list[float]] | None:
        buckets = self._spent.get(key)
        if buckets is None:
            return None
        edge = now - self.window
        while buckets and buckets[0][0] + self.bucket <= edge:
            self._sums[key] -= buckets.popleft()[1]
        if not buckets:
            del self._spent[key], self._sums[key]
            return None
        return buckets

    def spent(self, key: str) -> int:
        now = self.clock()
        return 0 if self._recent(key, now) is None else int(self._sums[key])

    def add(self, key: str, tokens: int) -> None:
        if tokens <= 0:
            return
        now = self.clock()
        buckets = self._recent(key, now)
        start = now - now % self.bucket
        if buckets is None:
            self._spent[key] = deque([[start, float(tokens)]])
            self._sums[key] = float(tokens)
            return
        if buckets[-1][0] == start:
            buckets[-1][1] += tokens
        else:
            buckets.append([start, float(tokens)])
        self._sums[key] += tokens

    def retry_after(self, key: str, budget: int) -> float | None:
        """None while less than `budget` is spent; else the seconds until enough ages out to be under it."""
        total = self._sums.get(key)
        if total is None or total < budget:  # (the sum before pruning is at least the one after)
            return None
        now = self.clock()
        buckets = self._recent(key, now)
        if buckets is None or self._sums[key] < budget:
            return None
        left = self._sums[key]
        for start, tokens in buckets:
            left -= tokens
            if left < budget:
                return max(0.0, start + self.bucket + self.window - now)
        return self.window  # not reached: the sum is the buckets'

    def prune(self) -> None:
        now = self.clock()
        for key in list(self._spent):
            self._recent(key, now)


class Guard:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.limiter = SlidingWindow(60.0, clock)
        self.failures = SlidingWindow(settings.auth_failure_window, clock)
        self.minute_tokens = TokenWindow(60.0, 1.0, clock)
        self.day_tokens = TokenWindow(86400.0, 60.0, clock)
        self.in_flight: dict[str, int] = {}
        self.good: dict[str, dict[str, float]] = {}  # address -> key id -> when it last got in
        self.revoked: frozenset[str] = frozenset()  # gateway.shared.revocation_tag of each revoked key
        self.spent: Callable[[str, int], None] | None = None  # also told of spent tokens (gateway.shared)

    # --- keys an address was using ---------------------------------------------------------------------------

    def got_in(self, address: str, key_id: str) -> None:
        keys = self.good.get(address)
        now = self.clock()
        if keys is not None and (at := keys.get(key_id)) is not None and now - at < GOOD_REFRESH:
            return  # seen within the last minute: nothing to change on the hot path
        if keys is None:
            if len(self.good) >= MAX_GOOD_ADDRESSES:
                self.good.pop(next(iter(self.good)))  # the address seen longest ago goes first
            keys = self.good[address] = {}
        elif len(keys) >= MAX_GOOD_PER_ADDRESS and key_id not in keys:
            keys.pop(next(iter(keys)))
        keys.pop(key_id, None)
        keys[key_id] = now

    def known(self, address: str, key_id: str) -> bool:
        """Whether `key_id` got in from `address` within GOOD_FOR seconds."""
        keys = self.good.get(address)
        at = None if keys is None else keys.get(key_id)
        return at is not None and self.clock() - at < GOOD_FOR

    # --- token budgets -----------------------------------------------------------------------------------------

    def budget_wait(self, key_id: str, per_minute: int | None, per_day: int | None) -> tuple[float, str] | None:
        """None when the key's budgets allow a request; else the seconds until one does and which budget."""
        waits = []
        if per_minute is not None and (wait := self.minute_tokens.retry_after(key_id, per_minute)) is not None:
            waits.append((wait, f"{per_minute} tokens per minute"))
        if per_day is not None and (wait := self.day_tokens.retry_after(key_id, per_day)) is not None:
            waits.append((wait, f"{per_day} tokens per day"))
        return max(waits) if waits else None

    def spend(self, key_id: str, tokens: int) -> None:
        self.minute_tokens.add(key_id, tokens)
        self.day_tokens.add(key_id, tokens)
        if self.spent is not None:
            self.spent(key_id, tokens)

    # --- concurrency -------------------------------------------------------------------------------------------

    def has_room(self, key_id: str, most: int | None) -> bool:
        """Whether the key may start one more request under `most` in flight (None: no cap)."""
        return most is None or self.in_flight.get(key_id, 0) < most

    def enter(self, key_id: str, most: int) -> bool:
        if not self.has_room(key_id, most):
            return False
        self.in_flight[key_id] = self.in_flight.get(key_id, 0) + 1
        return True

    def leave(self, key_id: str) -> None:
        running = self.in_flight.get(key_id, 0) - 1
        if running > 0:
            self.in_flight[key_id] = running
        else:
            self.in_flight.pop(key_id, None)

    def prune(self) -> None:
        self.limiter.prune()
        self.failures.prune()
        self.minute_tokens.prune()
        self.day_tokens.prune()
        now = self.clock()
        for address in list(self.good):
            keys = self.good[address]
            for key_id in [k for k, at in keys.items() if now - at >= GOOD_FOR]:
                del keys[key_id]
            if not keys:
                del self.good[address]


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
