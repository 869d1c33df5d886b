"""API keys: who may call, checked in constant time, reloaded from the keys file without a restart.

Fails closed: with AUTH_ENABLED=true and no usable key, every protected request gets a 401. Repeated failed keys
from one client address are answered 429 for a while, and so is any key that address was not already using, so
keys cannot be guessed at speed while its good traffic goes on. What a key may use (gateway.scopes) and how much
(token budgets, max_concurrent, the rate limit: gateway.guard) is decided here too, in verdict() and charge().
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

from gateway.guard import Guard, retry_after
from gateway.keyfile import (
    MIN_KEY_LENGTH,
    KeyEntry,
    KeyLineError,
    ShortKeyError,
    digest,
    key_lines,
    parse_keys,
    parse_line,
    read_text,
)
from gateway.ratelimit import Decision
from gateway.scopes import route_refusal
from gateway.shared import Facts, Shared, revocation_tag
from lifecycle.settings import Settings

log = logging.getLogger("gateway.auth")


@dataclass(frozen=True)
class KeyRing:
    entries: tuple[KeyEntry, ...] = ()
    _by_digest: dict[bytes, KeyEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_digest: dict[bytes, KeyEntry] = {}
        for entry in self.entries:
            by_digest.setdefault(entry.digest, entry)  # a key listed twice: the first line wins
        object.__setattr__(self, "_by_digest", by_digest)

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, presented: str) -> KeyEntry | None:
        """The entry for `presented`, looked up by the key's SHA-256 digest.

        Nothing is compared with a stored key itself, only digests: a caller controls the input of the hash, not
        its output, so how long the lookup takes says nothing usable about any stored key. One lookup, however many
        keys the file holds (a loop of constant-time comparisons cost 0.1 us per key on every request)."""
        return self._by_digest.get(digest(presented))


def bearer_token(header: str) -> str:
    """`Bearer <key>` or, as in the seed, the bare key."""
    scheme, _, token = header.strip().partition(" ")
    if token and scheme.lower() == "bearer":
        return token.strip()
    return header.strip()


def utcnow() -> datetime:
    return datetime.now(UTC)


Stamp = tuple[int, int, int, int, int]
MISSING = "the keys file is missing"


def _stamp(st: os.stat_result) -> Stamp:
    # ctime too: a chmod that makes an unreadable file readable changes nothing else, and must be picked up.
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)


def too_open(mode: int) -> bool:
    """Group or others may read or write the file (what ssh refuses for a private key)."""
    return bool(mode & 0o077)


def plaintext_keys(text: str) -> list[tuple[int, str, bool]]:
    """(line number, key id, short) for each plaintext key in a keys file: the ones loaded (short=False) and the
    ones refused for being under MIN_KEY_LENGTH characters (short=True). Never the key."""
    found = []
    for number, line in key_lines(text):
        try:
            if not parse_line(line).hashed:
                found.append((number, line.partition(":")[0], False))
        except ShortKeyError:
            found.append((number, line.partition(":")[0], True))
        except KeyLineError:
            pass
    return found


class KeyStore:
    """Owns the current KeyRing. Reloads happen off the request path: file I/O runs in a worker thread.

    A keys file that cannot be read fails closed: the ring becomes empty (every API request gets 401) and one
    warning names the file and the kind of error, never its content. Reading never raises, so neither start-up,
    SIGHUP, the watcher nor `POST /reload` can fail on a bad file, and no exception text (which could quote the
    file) reaches a log.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ring = KeyRing()
        self.problem: str | None = None  # why the last read loaded nothing, in words without any key
        self._stamp: Stamp | None = None
        self._warned_modes: set[tuple[str, int]] = set()
        self._warned_plaintext: set[tuple[str, bool]] = set()  # (key id, short): warned once per process
        # told (old ring, new ring) after each reload that read the file and put a new ring in place (not after
        # one that failed: a file that cannot be read revokes nothing): gateway.shared's revocations
        self.on_change: Callable[[KeyRing, KeyRing], None] | None = None

    def _read(self, force: bool) -> KeyRing | None:
        """The new ring, or None when the file is unchanged since the last read (and `force` is false)."""
        try:
            st: os.stat_result | None = os.stat(self.path)
        except OSError:
            st = None
        stamp = None if st is None else _stamp(st)
        if not force and stamp == self._stamp:
            return None
        # Taken before the read: a change made while reading shows up as a new stamp at the next check.
        self._stamp = stamp
        if st is None:
            if force or self.problem != MISSING:
                log.warning("keys file %s is missing: no API keys loaded", self.path)
            self.problem = MISSING
            return KeyRing()
        self._check_mode(st.st_mode)
        try:
            text = read_text(self.path)
            ring = KeyRing(tuple(parse_keys(text, str(self.path))))
        except Exception as exc:  # fail closed on anything; the text of `exc` may quote the file, so only its type
            reason = type(exc).__name__
            if isinstance(exc, OSError) and exc.strerror:
                reason += f": {exc.strerror}"
            log.warning("cannot read keys file %s (%s): no API keys loaded, every API request gets 401",
                        self.path, reason)
            self.problem = f"cannot read the keys file ({reason})"
            return KeyRing()
        self.problem = None
        log.info("loaded %d API key(s) from %s", len(ring), self.path)
        try:
            self._warn_plaintext(text)
        except Exception as exc:  # a warning must never cost the keys just read
            log.warning("could not check keys file %s for plaintext keys (%s)", self.path, type(exc).__name__)
        return ring

    def _warn_plaintext(self, text: str) -> None:
        """Warn loudly, once per key id per process, about each plaintext key, and louder about each one that is
        refused for being short (the old project accepted them). Never the key."""
        from gateway.keys import command  # the CLI's hints (gateway.keys imports nothing of this module)

        for number, key_id, short in plaintext_keys(text):
            if (key_id, short) in self._warned_plaintext:
                continue
            self._warned_plaintext.add((key_id, short))
            if short:
                log.warning(
                    "keys file %s line %d: key id %s is REFUSED: its plaintext key is shorter than %d characters, "
                    "short enough to be guessed (the old project accepted such keys); every request with it gets "
                    "401. Give it a new key with: %s && %s", self.path, number, key_id, MIN_KEY_LENGTH,
                    command(self.path, "remove", "--name", key_id), command(self.path, "generate", "--name", key_id))
            else:
                log.warning(
                    "keys file %s line %d: key id %s is stored in plaintext: anyone who can read the file (or a "
                    "backup of it) can use the key; hash it in place, keeping the key working, with: %s",
                    self.path, number, key_id, command(self.path, "import"))

    def _check_mode(self, mode: int) -> None:
        """Warn once per file and mode, as ssh does, when others may read the keys."""
        mode = stat.S_IMODE(mode)
        seen = (str(self.path), mode)
        if not too_open(mode) or seen in self._warned_modes:
            return
        self._warned_modes.add(seen)
        log.warning("keys file %s has mode %04o: other users can read or change it; restrict it with: chmod 600 %s",
                    self.path, mode, shlex.quote(str(self.path)))

    def load(self) -> KeyRing:
        """Blocking first load, before the event loop serves requests."""
        ring = self._read(force=True)
        self.ring = ring if ring is not None else self.ring
        return self.ring

    async def reload(self, force: bool = False) -> bool:
        """Read the file again (if it changed, or always with `force`); True when a new ring is in place.

        Never raises (but for cancellation): `_read` fails closed by itself, and anything else is logged by its
        type alone."""
        try:
            ring = await asyncio.to_thread(self._read, force)
        except Exception as exc:  # e.g. no thread could be started: the ring stays as it was
            log.warning("reloading keys file %s failed (%s)", self.path, type(exc).__name__)
            return False
        if ring is None:
            return False
        old, self.ring = self.ring, ring
        if self.on_change is not None and self.problem is None:
            self.on_change(old, ring)
        return True

    async def watch(self, interval: float = 1.0, changed: Callable[[], Awaitable[object]] | None = None) -> None:
        """Pick up a changed file by itself, checking at most once a second; `changed` is awaited after each
        reload that put a new ring in place (the audit log's line)."""
        while True:
            await asyncio.sleep(interval)
            if await self.reload() and changed is not None:
                await changed()


ANONYMOUS = "anonymous"


class Admitted(NamedTuple):
    """The caller may go on: its key id (`anonymous` with AUTH_ENABLED=false), its rate-limit decision for the
    X-RateLimit-* headers (None with AUTH_ENABLED=false, or when only looked), its requests-per-minute limit,
    whether its key is an admin key (`admin=true` in the keys file; never for `anonymous`: see require_admin), its
    keys-file entry (None for `anonymous`: its scopes, budgets and concurrency), and whether it holds a place in its
    key's `max_concurrent` (given back by Guard.leave when the request is recorded: gateway.pipeline.record)."""

    key_id: str
    decision: Decision | None
    limit: int | None = None
    admin: bool = False
    entry: KeyEntry | None = None
    holds: bool = False


class Refused(NamedTuple):
    """The exact refusal to give: status, OpenAI error message and code, extra headers, the rejection reason for
    the metrics, and the key id when one was known (a rate-limited or expired key)."""

    status: int
    message: str
    code: str
    reason: str  # gateway.metrics.REJECTION_REASONS
    headers: dict[str, str] | None = None
    key_id: str | None = None
    decision: Decision | None = None


def verdict(
    ring: KeyRing, guard: Guard, settings: Settings, header: str, client: str, path: str,
    *, consume: bool = True, now: datetime | None = None, facts: Facts | None = None,
    identified: KeyEntry | Refused | None = None,
) -> Admitted | Refused:
    """Who is calling and whether they may: the one auth, scope, budget and rate-limit rule of both lanes.

    `header` is the credential's value (gateway.auth.credential), `client` the caller's address, `path` the route.
    In order: the key (a bad key counts against `client`; a revoked one is refused: Guard.revoked, and the
    shared set); an address over AUTH_FAILURE_LIMIT failures is refused anything but the keys it was already using
    (Guard.known), so guesses stop and its good traffic does not; the key's route groups (gateway.scopes); then
    charge(): token budgets, concurrency and the rate limit. With consume=True (the default) charge() is done here;
    consume=False only looks (the fast lane's first look, before it parses the body; it then checks the model and
    calls charge() itself).

    `facts`: what the shared windows said (gateway.shared, with REDIS_URL: judge() below), read in place of the
    replica's own failed-key, recent-key, budget and rate windows; the replica's own are kept current too, for
    when Redis is down. `identified`: what identify() already said of `header` with this ring (judge(), the fast
    lane), so the key is not looked up again."""
    if not settings.auth_enabled:
        return Admitted(ANONYMOUS, None)
    entry = identify(ring, header, now) if identified is None else identified
    if not isinstance(entry, Refused) and (revoked(guard, entry) or (facts is not None and facts.revoked)):
        entry = Refused(401, "this API key has been revoked", "revoked_api_key", "auth", key_id=entry.key_id)
    blocked = facts.blocked if facts is not None else guard.failures.check(client, settings.auth_failure_limit,
                                                                           consume=False)
    if isinstance(entry, Refused):
        if not blocked.allowed:
            return _too_many_failures(blocked)
        if consume:
            guard.failures.add(client)
        return entry
    if not blocked.allowed and not (facts.known if facts is not None else guard.known(client, entry.key_id)):
        return _too_many_failures(blocked)
    refused = route_refusal(entry, path, settings.passthrough_routes)
    if refused is not None:
        return refused
    looked = Admitted(entry.key_id, None, rate_limit(entry, settings), entry.admin, entry)
    if not consume:
        return looked  # only looked: charge() takes its place in the limits later
    return charge(guard, looked, client, facts)


def rate_limit(entry: KeyEntry, settings: Settings) -> int:
    """A key's requests per minute: its own limit, else MAX_REQUESTS_PER_MINUTE."""
    return entry.rate_limit or settings.max_requests_per_minute


def revoked(guard: Guard, entry: KeyEntry) -> bool:
    """Whether `entry`'s key was removed or rotated away on some replica (the copy of the shared revoked set)."""
    return bool(guard.revoked) and revocation_tag(entry.digest) in guard.revoked


async def judge(
    ring: KeyRing, guard: Guard, shared: Shared, settings: Settings, header: str, client: str, path: str,
    *, consume: bool = True, now: datetime | None = None, identified: KeyEntry | Refused | None = None,
) -> Admitted | Refused:
    """verdict() with the shared windows (REDIS_URL): one Redis round trip for the facts, then verdict() decides
    with them. Only what verdict() needs beforehand and uses nothing up is worked out here (the key, its route
    group, whether its max_concurrent has room, all per replica); with Redis down, verdict() alone. consume=False:
    a refused key is not counted as a failure (the fast lane hands a refusal to aiohttp's lane, which counts it)."""
    if not settings.auth_enabled:
        return Admitted(ANONYMOUS, None)
    entry = identify(ring, header, now) if identified is None else identified
    if isinstance(entry, Refused) or revoked(guard, entry):
        valid, digest_, key_id, route_ok, free, limit, per_minute, per_day = False, b"", "", False, False, 0, None, None
    else:
        valid, digest_, key_id = True, entry.digest, entry.key_id
        route_ok = route_refusal(entry, path, settings.passthrough_routes) is None
        free = guard.has_room(key_id, entry.max_concurrent)
        limit = rate_limit(entry, settings)
        per_minute, per_day = entry.tokens_per_minute, entry.tokens_per_day
    facts = await shared.judge(valid, digest_, key_id, client, route_ok, free, limit, per_minute, per_day, consume)
    # a key that is let in is charged whatever `consume` says (the script took its place in the rate window)
    refusing = not valid or (facts is not None and facts.revoked)
    return verdict(ring, guard, settings, header, client, path, consume=consume or not refusing, now=now,
                   facts=facts, identified=entry)


def _too_many_failures(blocked: Decision) -> Refused:
    return Refused(429, "too many failed API keys from this address; retry later", "too_many_auth_failures",
                   "auth", {"Retry-After": str(blocked.retry_after)})


def charge(guard: Guard, looked: Admitted, client: str, facts: Facts | None = None) -> Admitted | Refused:
    """The last step of verdict(): the key's token budgets and `max_concurrent` (each a 429 with Retry-After when
    spent), then a place in its rate limit (the 429 `rate_limit_exceeded` when there is none). Nothing is used up
    unless all pass; then the request holds a place in `max_concurrent` until it is recorded, and `client` is
    remembered as an address this key uses. With `facts` (gateway.shared), the budgets' wait and the rate decision
    are the shared windows' (which took the place in the rate window already); the replica's own rate window
    counts the request too, for when Redis is down."""
    entry = looked.entry
    assert entry is not None and looked.limit is not None
    key_id = entry.key_id
    if entry.budgeted:
        wait = facts.budget if facts is not None else guard.budget_wait(key_id, entry.tokens_per_minute,
                                                                         entry.tokens_per_day)
        if wait is not None:
            seconds, budget = wait
            return Refused(429, f"the token budget of {budget} of this API key is spent; retry in "
                                f"{retry_after(seconds)}s", "token_budget_exceeded", "budget",
                           {"Retry-After": retry_after(seconds)}, key_id)
    if not guard.has_room(key_id, entry.max_concurrent):
        return Refused(429, f"this API key already has {entry.max_concurrent} requests in flight "
                            f"(max_concurrent); retry when one is done", "too_many_concurrent_requests", "budget",
                       {"Retry-After": "1"}, key_id)
    if facts is not None and facts.rate is not None:
        decision = facts.rate
        if decision.allowed:
            guard.limiter.add(key_id)
    else:
        decision = guard.limiter.check(key_id, looked.limit)
    if not decision.allowed:
        return Refused(429, f"rate limit of {looked.limit} requests per minute exceeded", "rate_limit_exceeded",
                       "rate", key_id=key_id, decision=decision)
    holds = entry.max_concurrent is not None and guard.enter(key_id, entry.max_concurrent)
    guard.got_in(client, key_id)
    return Admitted(key_id, decision, looked.limit, entry.admin, entry, holds)


def finished(guard: Guard, caller: Admitted | None, tokens: Callable[[], int] | None) -> bool:
    """A request `caller` was let in for is over: its place in `max_concurrent` is given back. With a token budget,
    its tokens are spent: at once when `tokens` is given (a stream: `tokens()` reads its tail now), else the caller
    leaves them to the observer's batch (gateway.observe, within FLUSH_INTERVAL: a whole answer read there with all
    the others costs far less than one read alone). True when the batch is to spend them."""
    if caller is None or caller.entry is None:
        return False
    if caller.holds:
        guard.leave(caller.key_id)
    if not caller.entry.budgeted:
        return False
    if tokens is None:
        return True
    guard.spend(caller.key_id, tokens())
    return False


ADMIN_REQUIRED = "this action needs an admin key"


def require_admin(admitted: Admitted) -> Refused | None:
    """The one rule of the admin routes (model load/unload/refresh): None when `admitted` may use them, else the 403
    to give (OpenAI `permission_error`, code `admin_key_required`).

    Only a key marked `admin=true` in the keys file may. With AUTH_ENABLED=false every caller is `anonymous`, which
    is never an admin: admin actions then need AUTH_ENABLED=true and an admin key (a caller that wants them open
    without keys has to decide so itself, before calling this)."""
    if admitted.admin:
        return None
    if admitted.key_id == ANONYMOUS and admitted.decision is None and admitted.limit is None:
        message = f"{ADMIN_REQUIRED}, and authentication is disabled (AUTH_ENABLED=false)"
    else:
        message = ADMIN_REQUIRED
    return Refused(403, message, "admin_key_required", "auth", key_id=admitted.key_id)


def credential(authorization: str, x_api_key: str) -> str:
    """The key a caller presents, as one header value: `Authorization` (`Bearer <key>` or the bare key), else
    `x-api-key` (how Anthropic's clients send it; llama-server reads the two the same way). The one rule of both
    lanes: the same key store, limits and refusals whichever header carries it."""
    return authorization if authorization.strip() else x_api_key


def identify(ring: KeyRing, header: str, now: datetime | None = None) -> KeyEntry | Refused:
    """The entry of the known, unexpired key in an Authorization header value, or why there is none."""
    token = bearer_token(header)
    entry = ring.match(token) if token else None
    if not ring:
        return Refused(401, "authentication is enabled but no API keys are configured", "no_api_keys", "auth")
    if not token:
        return Refused(401, "missing API key: send Authorization: Bearer <key> (or x-api-key: <key>)",
                       "missing_api_key", "auth")
    if entry is None:
        return Refused(401, "invalid API key", "invalid_api_key", "auth")
    if entry.expires is not None and entry.expired(now or utcnow()):  # no clock read for keys that never expire
        return Refused(401, "this API key has expired", "expired_api_key", "auth", key_id=entry.key_id)
    return entry


def caller_key(ring: KeyRing, header: str) -> KeyEntry | None:
    """The entry of a known, unexpired key sent in an Authorization header value; None for anything else."""
    entry = identify(ring, header)
    return None if isinstance(entry, Refused) else entry
