"""Limits shared by every replica through Redis (REDIS_URL): rate limits, token budgets, failed-key throttling and
revoked keys, so a key limited to 60 requests a minute gets 60 in all, and a key removed on one replica is refused
by all of them.

One Redis round trip per request: the JUDGE script reads and updates every window a request needs, atomically, on
Redis's own clock (so replicas whose clocks differ still share one window). Requests that arrive together share
their round trip: every request judged in one turn of the event loop goes out in one JUDGE call that judges them
in order (auto-pipelining, as ioredis's enableAutoPipelining, one step further: one script call, not a pipeline
of them), so 32 concurrent requests cost the event loop about what one call does. Token spending is batched: each
replica sends what its answers spent at most every SPEND_INTERVAL, in one SPEND call, off the request path.

The decisions stay gateway.auth.verdict's: the script supplies the facts (is the address blocked, did it use this key
lately, is the key revoked, the budgets' wait, the rate decision) and takes a place in the rate window only in the
one case verdict() will admit the request, given what the caller told it (route allowed, concurrency free). The
order of the script's checks is verdict()'s, in the same words; tests/unit/test_shared.py checks that both give
the same answer for every case.

When Redis cannot be reached (a call fails or takes longer than REDIS_TIMEOUT), `Shared` says so once, goes `down`
and the gateway judges with its own per-replica windows (gateway.guard) until a probe, once a second, reaches Redis
again; nothing waits on a Redis that is gone. Keys revoked before (or during) the outage stay refused: every replica
keeps a copy of the revoked set (Guard.revoked), refreshed every SYNC_INTERVAL, and revocations made while Redis is
down are sent when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from gateway.guard import GOOD_FOR, GOOD_REFRESH
from gateway.ratelimit import Decision

log = logging.getLogger("gateway.shared")

PREFIX = "llama-gguf:"
REVOKED = PREFIX + "revoked"  # zset: revocation tag -> when (unix seconds)
REVOKED_VERSION = PREFIX + "revoked:version"  # bumped by every change to REVOKED
MAX_REVOKED = 100_000  # the oldest revocations are forgotten past this many
SYNC_INTERVAL = 0.5  # seconds between reads of the revoked set (a revocation reaches every replica within 1 s)
PROBE_INTERVAL = 1.0  # seconds between tries to reach Redis while it is down
SPEND_INTERVAL = 0.1  # seconds between batches of spent tokens
MINUTE, DAY = (60, 1), (86400, 60)  # (window, bucket) in seconds: gateway.guard.Guard's TokenWindows

# One call judges a batch: every request judged in one turn of a replica's event loop, in order, atomically.
# ARGV: 1 PREFIX, 2 the batch (a JSON array of requests), 3 AUTH_FAILURE_LIMIT, 4 AUTH_FAILURE_WINDOW, 5 GOOD_FOR,
#       6 GOOD_REFRESH
# A request: {1 valid (1: the key is known and unexpired here), 2 its revocation tag, 3 key id, 4 route allowed (1),
#             5 concurrency free (1), 6 requests per minute, 7 tokens per minute (0: none), 8 tokens per day (0:
#             none), 9 a unique member name, 10 count a failed key (1; 0: only look), 11 the caller's address}
# Its keys, PREFIX + ...: fail:<address> (zset of failures), good:<address> (hash: key id -> last used),
#       revoked (zset), rate:<key id> (zset), tok:m:<key id> and tok:d:<key id> (hash of buckets + "sum") with
#       their lists of bucket starts (":b"). (Built here rather than passed: one argument for the whole batch is
#       far cheaper to send; Redis Cluster, which needs keys declared, is not supported.)
# Returns, per request, {blocked, blocked reset ms, known, revoked, budget wait ms (-1: none), budget (1 minute,
#          2 day), rate (-1 not looked, 0 refused, 1 allowed), remaining, rate reset ms}
# Both scripts name a key's token windows the same way: one place.
TOKEN_WINDOWS = """
local function token_window(P, key, which)  -- which: 'm' (minute) or 'd' (day); the hash of buckets + "sum",
  local h = P .. 'tok:' .. which .. ':' .. key  -- and the list of its bucket starts
  return h, h .. ':b'
end
"""
JUDGE = TOKEN_WINDOWS + """
local P = ARGV[1]
local batch = cjson.decode(ARGV[2])
local flimit, fwindow = tonumber(ARGV[3]), tonumber(ARGV[4])
local good_for, good_refresh = tonumber(ARGV[5]), tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local function window(key, limit, span)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - span)
  local n = redis.call('ZCARD', key)
  if n >= limit then
    local at = redis.call('ZRANGE', key, n - limit, n - limit, 'WITHSCORES')
    return n, tonumber(at[2]) + span - now
  end
  return n, 0
end

local function tokens(h, l, span, bucket, budget)
  local edge = now - span
  while true do
    local oldest = redis.call('LINDEX', l, 0)
    if not oldest or tonumber(oldest) + bucket > edge then break end
    redis.call('LPOP', l)
    local spent = tonumber(redis.call('HGET', h, oldest) or '0')
    redis.call('HDEL', h, oldest)
    redis.call('HINCRBY', h, 'sum', -spent)
  end
  local left = tonumber(redis.call('HGET', h, 'sum') or '0')
  if left < budget then return -1 end
  for _, start in ipairs(redis.call('LRANGE', l, 0, -1)) do
    left = left - tonumber(redis.call('HGET', h, start) or '0')
    if left < budget then return math.max(0, tonumber(start) + bucket + span - now) end
  end
  return span
end

local function judge(A)
  local fail, good = P .. 'fail:' .. A[11], P .. 'good:' .. A[11]
  local n, reset = window(fail, flimit, fwindow)
  local blocked = n >= flimit and 1 or 0
  local valid = A[1] == 1
  local revoked = 0
  if valid and redis.call('ZSCORE', P .. 'revoked', A[2]) then revoked = 1 end
  local out = {blocked, math.ceil(reset * 1000), 0, revoked, -1, 0, -1, 0, 0}
  if not valid or revoked == 1 then
    if blocked == 0 and A[10] == 1 then
      redis.call('ZADD', fail, now, A[9])
      redis.call('EXPIRE', fail, math.ceil(fwindow) + 1)
    end
    return out
  end
  local key = A[3]
  local at = tonumber(redis.call('HGET', good, key) or '-1')
  local known = at >= 0 and now - at < good_for
  if known then out[3] = 1 end
  if (blocked == 1 and not known) or A[4] ~= 1 then return out end
  local budgets = {{A[7], 'm', 60, 1, 1}, {A[8], 'd', 86400, 60, 2}}
  for _, b in ipairs(budgets) do
    local budget = b[1]
    if budget > 0 then
      local h, l = token_window(P, key, b[2])
      local wait = tokens(h, l, b[3], b[4], budget)
      if wait >= 0 and math.ceil(wait * 1000) > out[5] then
        out[5], out[6] = math.ceil(wait * 1000), b[5]
      end
    end
  end
  if out[5] >= 0 or A[5] ~= 1 then return out end
  local rate, limit = P .. 'rate:' .. key, A[6]
  local hits, rate_reset = window(rate, limit, 60)
  if hits >= limit then
    out[7], out[9] = 0, math.ceil(rate_reset * 1000)
    return out
  end
  redis.call('ZADD', rate, now, A[9])
  redis.call('EXPIRE', rate, 61)
  local first = redis.call('ZRANGE', rate, 0, 0, 'WITHSCORES')
  out[7], out[8], out[9] = 1, limit - hits - 1, math.ceil((tonumber(first[2]) + 60 - now) * 1000)
  if not known or now - at >= good_refresh then
    redis.call('HSET', good, key, now)
    redis.call('EXPIRE', good, math.ceil(good_for))
  end
  return out
end

local replies = {}
for i, A in ipairs(batch) do replies[i] = judge(A) end
return replies
"""

# ARGV: 1 PREFIX, 2 a JSON object: key id -> tokens spent. Each window's bucket of now, as TokenWindow.add.
SPEND = TOKEN_WINDOWS + """
local P = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1])
for key, n in pairs(cjson.decode(ARGV[2])) do
  for _, w in ipairs({{'m', 1, 61}, {'d', 60, 86460}}) do
    local h, l = token_window(P, key, w[1])
    local start = tostring(now - now % w[2])
    if redis.call('LINDEX', l, -1) ~= start then redis.call('RPUSH', l, start) end
    redis.call('HINCRBY', h, start, n)
    redis.call('HINCRBY', h, 'sum', n)
    redis.call('EXPIRE', h, w[3])
    redis.call('EXPIRE', l, w[3])
  end
end
return 1
"""
SCRIPTS = {script: hashlib.sha1(script.encode()).hexdigest() for script in (JUDGE, SPEND)}


class Facts(NamedTuple):
    """What the shared windows said about one request, in place of the replica's own (gateway.auth.verdict)."""

    blocked: Decision  # the address's failed keys: allowed=False when it is over AUTH_FAILURE_LIMIT
    known: bool  # the address used this key within GOOD_FOR
    revoked: bool
    budget: tuple[float, str] | None  # (seconds until the budget allows a request, which budget), None: allowed
    rate: Decision | None  # None: not looked at (an earlier check refuses)


def _expire(batch: list[tuple[list[object], asyncio.Future[list[int]]]]) -> None:
    """REDIS_TIMEOUT is up: the requests of `batch` still waiting give up (and Redis counts as down)."""
    for _, reply in batch:
        if not reply.done():
            reply.set_exception(TimeoutError("no answer from Redis within REDIS_TIMEOUT"))


@functools.lru_cache(maxsize=4096)
def revocation_tag(digest: bytes) -> str:
    """The name a key's revocation goes by in Redis: a hash of the keys file's digest, so Redis never holds what
    the file holds."""
    return hashlib.sha256(b"llama-gguf-inference revoked\0" + digest).hexdigest()[:40]


class Shared:
    """The shared windows of one gateway process, and whether Redis is reachable (`up`).

    `judge()` is the request path's one call; `spend()`, `keys_changed()` only queue work for `run()`, the
    background task that sends spent tokens, keeps the revoked set's copy current (`on_revoked`) and, while Redis
    is down, probes it."""

    def __init__(self, url: str, timeout: float, failure_limit: int, failure_window: float,
                 on_revoked: Callable[[frozenset[str]], None] = lambda tags: None) -> None:

        # no retries: a call that fails falls back at once, and the probe finds Redis again
        self.redis = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                             retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self.timeout = timeout
        self.failure_limit, self.failure_window = failure_limit, failure_window
        self.on_revoked = on_revoked
        self.up = True  # until a call fails; start() finds out at once
        self.fallbacks = 0  # requests judged by this replica alone while Redis was down
        self._batch: list[tuple[list[object], asyncio.Future[list[int]]]] = []
        self._nonce = itertools.count()
        self._replica = os.urandom(6).hex()
        self._pending: dict[str, int] = {}  # key id -> tokens not yet sent
        self._changes: dict[str, bool] = {}  # tag -> revoked (True) or allowed again (False), not yet sent
        self._version: bytes | None = None
        self._known: frozenset[str] = frozenset()  # the revoked set last handed to on_revoked
        self._wake = asyncio.Event()
        self._sending: asyncio.Task[None] | None = None  # the JUDGE call on its way
        self._batch_timer: asyncio.TimerHandle | None = None  # REDIS_TIMEOUT for the requests of self._batch

    # --- the request path ----------------------------------------------------------------------------------

    async def judge(self, valid: bool, digest: bytes, key_id: str, address: str, route_ok: bool, free: bool,
                    limit: int, per_minute: int | None, per_day: int | None, count_failure: bool) -> Facts | None:
        """One round trip: the facts of one request, the rate window taken when verdict() admits it. None when Redis
        is down (now or since before): the caller judges with its own windows."""
        if not self.up:
            self.fallbacks += 1
            return None
        item = [int(valid), revocation_tag(digest) if valid else "", key_id, int(route_ok), int(free), limit,
                per_minute or 0, per_day or 0, f"{self._replica}:{next(self._nonce)}", int(count_failure), address]
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[list[int]] = loop.create_future()
        if not self._batch:  # a new batch: one timer for all its requests (cheaper than a timeout each)
            self._batch_timer = loop.call_later(self.timeout, _expire, self._batch)
            if self._sending is None:  # else it goes when the call on its way is answered
                loop.call_soon(self._send_batch)  # once this turn of the loop is over
        self._batch.append((item, reply))
        try:
            out = await reply  # within REDIS_TIMEOUT: the batch's timer fails it after that
        except Exception as exc:  # anything at all: a Redis that fails must not fail the request
            self._went_down(exc)
            self.fallbacks += 1
            return None
        blocked, blocked_ms, known, revoked, budget_ms, budget, rate, remaining, reset_ms = (int(v) for v in out)
        limit_fl = self.failure_limit
        facts_budget = None
        if budget_ms >= 0:
            facts_budget = (budget_ms / 1000, f"{per_minute} tokens per minute" if budget == 1
                            else f"{per_day} tokens per day")
        decision = None if rate < 0 else Decision(bool(rate), limit, remaining, reset_ms / 1000)
        return Facts(Decision(not blocked, limit_fl, 0, blocked_ms / 1000), bool(known), bool(revoked),
                     facts_budget, decision)

    def _send_batch(self) -> None:
        """The batch's one JUDGE call. One call at a time: requests that come while one is on its way make the next
        batch, sent as soon as it is answered (so batches grow with the load, and cost the loop less per request
        the busier it is; alone, a request goes at once)."""
        if self._sending is not None or not self._batch:
            return
        batch, timer, self._batch = self._batch, self._batch_timer, []
        self._sending = asyncio.get_running_loop().create_task(self._judge_all(batch))
        self._sending.add_done_callback(lambda _: self._sent(timer))

    def _sent(self, timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()
        self._sending = None
        self._send_batch()

    async def _judge_all(self, batch: list[tuple[list[object], asyncio.Future[list[int]]]]) -> None:
        """One JUDGE call for the batch; each reply to its request."""
        args = (PREFIX, json.dumps([item for item, _ in batch], separators=(",", ":")), self.failure_limit,
                self.failure_window, GOOD_FOR, GOOD_REFRESH)
        replies: list[object]
        try:
            replies = await self._eval(JUDGE, *args)  # type: ignore[assignment]
        except Exception as exc:
            replies = [exc] * len(batch)
        for (_, reply), out in zip(batch, replies, strict=True):
            if reply.done():
                continue  # its request gave up waiting (REDIS_TIMEOUT)
            if isinstance(out, BaseException):
                reply.set_exception(out)
            else:
                reply.set_result(out)  # type: ignore[arg-type]

    # --- queued for run() ----------------------------------------------------------------------------------

    def spend(self, key_id: str, tokens: int) -> None:
        """Tokens a key's answer used: sent within SPEND_INTERVAL (dropped when Redis is down: the replica's own
        windows count them)."""
        if tokens > 0 and self.up:
            self._pending[key_id] = self._pending.get(key_id, 0) + tokens

    def keys_changed(self, removed: Iterable[bytes], added: Iterable[bytes]) -> None:
        """The keys file of this replica changed: keys removed or rotated away are revoked for every replica, keys
        added (back) are allowed again. Sent at once, or when Redis is back."""
        for digest in removed:
            self._changes[revocation_tag(digest)] = True
        for digest in added:
            self._changes[revocation_tag(digest)] = False
        self._wake.set()

    # --- the background task -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: send changes and spent tokens, refresh the revoked set; probe while down."""
        next_sync = 0.0
        while True:
            if not self.up:
                await asyncio.sleep(PROBE_INTERVAL)
                await self._probe()
                continue
            if self._changes:
                await self._send_changes()
            if self._pending and self.up:
                await self._send_spent()
            now = time.monotonic()
            if now >= next_sync and self.up:
                await self._sync()
                next_sync = now + SYNC_INTERVAL
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SPEND_INTERVAL):
                    await self._wake.wait()
            self._wake.clear()

    async def start(self) -> None:
        """Before the first request: reach Redis (or say it is down) and read the revoked set."""
        await self._sync()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._pending and self.up:
                await self._send_spent()
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _eval(self, script: str, *args: object) -> object:
        """One of our scripts, by its hash; a Redis that does not know it yet (new, restarted, flushed) gets it
        loaded, then the call again: one more round trip, once."""
        try:
            return await self.redis.evalsha(SCRIPTS[script], 0, *args)
        except NoScriptError:
            await self.redis.script_load(script)
            return await self.redis.evalsha(SCRIPTS[script], 0, *args)

    async def _call(self, what: Callable[[], object]) -> object:
        async with asyncio.timeout(self.timeout * 4):  # background work: a little more patience
            return await what()  # type: ignore[misc]

    async def _probe(self) -> None:
        try:
            await self._call(self.redis.ping)
        except Exception:
            return
        self.up = True
        self._version = None
        log.warning("Redis at REDIS_URL is reachable again: rate limits, token budgets, failed keys and "
                    "revocations are shared by every replica again")
        self._wake.set()

    async def _send_changes(self) -> None:
        changes, self._changes = self._changes, {}
        revoked = {tag: time.time() for tag, gone in changes.items() if gone}
        allowed = [tag for tag, gone in changes.items() if not gone]

        async def send() -> object:
            pipe = self.redis.pipeline(transaction=True)
            if revoked:
                pipe.zadd(REVOKED, revoked)
            if allowed:
                pipe.zrem(REVOKED, *allowed)
            pipe.zremrangebyrank(REVOKED, 0, -MAX_REVOKED - 1)
            pipe.incr(REVOKED_VERSION)
            return await pipe.execute()

        try:
            await self._call(send)
        except Exception as exc:
            for tag, gone in changes.items():
                self._changes.setdefault(tag, gone)  # sent when Redis is back
            self._went_down(exc)

    async def _send_spent(self) -> None:
        pending, self._pending = self._pending, {}

        try:
            await self._call(lambda: self._eval(SPEND, PREFIX, json.dumps(pending)))
        except Exception as exc:
            self._went_down(exc)

    async def _sync(self) -> None:
        """Read the revoked set when its version changed (one GET otherwise) and hand it to `on_revoked`, with the
        changes of this replica not yet sent (so they hold here meanwhile)."""
        try:
            version = await self._call(lambda: self.redis.get(REVOKED_VERSION))
            if version == self._version and self._version is not None:
                return
            if version is None and self._known:
                # Redis lost its data (restarted without persistence, or flushed): what this replica knew is
                # revoked is sent back, so that no revocation is lost (changes of its own not yet sent win)
                for tag in self._known:
                    self._changes.setdefault(tag, True)
                await self._send_changes()
                version = await self._call(lambda: self.redis.get(REVOKED_VERSION))
            tags = await self._call(lambda: self.redis.zrange(REVOKED, 0, -1))
        except Exception as exc:
            self._went_down(exc)
            return
        self._version = version  # type: ignore[assignment]
        current = {tag.decode() if isinstance(tag, bytes) else str(tag) for tag in tags}  # type: ignore[union-attr]
        for tag, gone in self._changes.items():
            if gone:
                current.add(tag)
            else:
                current.discard(tag)
        self._known = frozenset(current)
        self.on_revoked(self._known)

    def _went_down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        self._pending.clear()
        # the exception's type only: its text can carry the URL, and the URL a password
        log.warning("Redis at REDIS_URL cannot be reached (%s): rate limits, token budgets and failed keys are "
                    "counted by this replica alone until it is back (keys revoked so far stay refused); trying "
                    "again every %.0f s", type(exc).__name__, PROBE_INTERVAL)
