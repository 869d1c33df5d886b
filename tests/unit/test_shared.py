"""gateway.shared against a real redis-server: the JUDGE script gives verdict() the same answers as the replica's own
windows (the order of its checks is verdict()'s), windows are shared between Shared objects (replicas), and a
Redis that is gone is a fallback, never a hang."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.auth import Admitted, KeyRing, Refused, judge, verdict
from gateway.guard import Guard
from gateway.keyfile import parse_keys
from gateway.shared import REVOKED, Shared, revocation_tag
from lifecycle.settings import Settings
from tests.conftest import RedisServer, free_port

KEYS = {
    "good": "sk-good-0123456789abcdef",
    "limited": "sk-limited-0123456789abcdef",
    "other": "sk-other-0123456789abcdef",
    "embedder": "sk-embedder-0123456789abcdef",
    "budget": "sk-budget-0123456789abcdef",
    "single": "sk-single-0123456789abcdef",
}
LINES = ("good:{good}\nlimited:{limited}:2\nother:{other}\nembedder:{embedder} routes=embeddings\n"
         "budget:{budget} tokens_per_minute=10\nsingle:{single} max_concurrent=1\n")
BAD = "sk-wrong-0123456789abcdef"
CHAT, EMBED = "/v1/chat/completions", "/v1/embeddings"


def world(tmp_path: Path) -> tuple[KeyRing, Guard, Settings]:
    ring = KeyRing(tuple(parse_keys(LINES.format(**KEYS))))
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_FAILURE_LIMIT": "3", "MAX_REQUESTS_PER_MINUTE": "5"},
                                 probe_roots=[])
    return ring, Guard(settings), settings


def shared_for(settings: Settings, url: str, timeout: float = 1.0) -> Shared:
    return Shared(url, timeout, settings.auth_failure_limit, settings.auth_failure_window)


def outcome(result: Admitted | Refused) -> tuple[object, ...]:
    if isinstance(result, Admitted):
        d = result.decision
        return ("in", result.key_id, None if d is None else (d.limit, d.remaining), result.holds)
    return ("out", result.status, result.code, (result.headers or {}).get("Retry-After"))


# (key or raw header, address, path, tokens spent afterwards, finished afterwards)
SCRIPT = [
    *[("good", "10.0.0.1", CHAT, 0, True)] * 6,  # the 6th: 429 rate_limit_exceeded (5 a minute)
    *[("limited", "10.0.0.1", CHAT, 0, True)] * 3,  # its own limit of 2
    ("embedder", "10.0.0.1", CHAT, 0, True),  # 403 route_not_allowed
    ("embedder", "10.0.0.1", EMBED, 0, True),
    ("budget", "10.0.0.1", CHAT, 12, True),
    ("budget", "10.0.0.1", CHAT, 0, True),  # 429 token_budget_exceeded
    ("single", "10.0.0.1", CHAT, 0, False),  # holds its one place
    ("single", "10.0.0.1", CHAT, 0, True),  # 429 too_many_concurrent_requests
    ("other", "10.0.0.2", CHAT, 0, True),  # 10.0.0.2 uses "other" before it fails
    *[(BAD, "10.0.0.2", CHAT, 0, True)] * 3,  # three failures: blocked
    (BAD, "10.0.0.2", CHAT, 0, True),  # 429 too_many_auth_failures
    ("good", "10.0.0.2", CHAT, 0, True),  # a key it never used: refused while blocked
    ("other", "10.0.0.2", CHAT, 0, True),  # the key it was using goes on
    ("", "10.0.0.3", CHAT, 0, True),  # 401 missing_api_key
]


def header(name: str) -> str:
    return f"Bearer {KEYS.get(name, name)}" if name else ""


def test_shared_windows_give_verdict_the_local_answers(tmp_path: Path, redis_server: RedisServer) -> None:
    ring, local_guard, settings = world(tmp_path)
    _, shared_guard, _ = world(tmp_path)

    async def run() -> list[tuple[tuple[object, ...], tuple[object, ...]]]:
        shared = shared_for(settings, redis_server.url)
        shared_guard.spent = shared.spend  # as gateway.app wires it
        await shared.start()
        pairs = []
        for name, address, path, spent, done in SCRIPT:
            mine = verdict(ring, local_guard, settings, header(name), address, path)
            theirs = await judge(ring, shared_guard, shared, settings, header(name), address, path)
            pairs.append((outcome(mine), outcome(theirs)))
            for guard, result in ((local_guard, mine), (shared_guard, theirs)):
                if isinstance(result, Admitted):
                    if spent:
                        guard.spend(result.key_id, spent)
                    if done and result.holds:
                        guard.leave(result.key_id)
            await shared._send_spent()
        assert shared.up and shared.fallbacks == 0
        await shared.close()
        return pairs

    pairs = asyncio.run(run())
    for (mine, theirs), step in zip(pairs, SCRIPT, strict=True):
        assert mine == theirs, step
    codes = [p[0][2] for p in pairs if p[0][0] == "out"]
    assert codes == ["rate_limit_exceeded", "rate_limit_exceeded", "route_not_allowed", "token_budget_exceeded",
                     "too_many_concurrent_requests", "invalid_api_key", "invalid_api_key", "invalid_api_key",
                     "too_many_auth_failures", "too_many_auth_failures", "missing_api_key"]


def test_replicas_share_one_rate_window_and_failed_keys(tmp_path: Path, redis_server: RedisServer) -> None:
    ring, _, settings = world(tmp_path)
    guards = [world(tmp_path)[1] for _ in range(3)]

    async def run() -> tuple[list[tuple[object, ...]], tuple[object, ...]]:
        replicas = [shared_for(settings, redis_server.url) for _ in guards]
        results = []
        for i in range(7):  # round robin over three replicas: 5 in, then refused on whichever replica
            n = i % 3
            results.append(outcome(await judge(ring, guards[n], replicas[n], settings, header("good"), "10.1.1.1",
                                               CHAT)))
        for n in range(3):  # one failed key on each replica: the address is blocked on all three
            await judge(ring, guards[n], replicas[n], settings, f"Bearer {BAD}", "10.1.1.2", CHAT)
        blocked = outcome(await judge(ring, guards[0], replicas[0], settings, f"Bearer {BAD}", "10.1.1.2", CHAT))
        for r in replicas:
            await r.close()
        return results, blocked

    results, blocked = asyncio.run(run())
    assert [r[0] for r in results] == ["in"] * 5 + ["out"] * 2
    assert [r[2] for r in results[:5]] == [(5, 4), (5, 3), (5, 2), (5, 1), (5, 0)]
    assert results[5][2] == "rate_limit_exceeded"
    assert blocked[2] == "too_many_auth_failures"


def test_a_revoked_key_is_refused_by_every_replica_and_allowed_again(tmp_path: Path, redis_server: RedisServer) -> None:
    ring, _guard_a, settings = world(tmp_path)
    _, guard_b, _ = world(tmp_path)
    entry = next(e for e in ring.entries if e.key_id == "other")

    async def run() -> list[tuple[object, ...]]:
        a = shared_for(settings, redis_server.url)
        b = shared_for(settings, redis_server.url)
        b.on_revoked = lambda tags: setattr(guard_b, "revoked", tags)
        out = [outcome(await judge(ring, guard_b, b, settings, header("other"), "10.2.2.2", CHAT))]
        a.keys_changed([entry.digest], [])
        await a._send_changes()
        out.append(outcome(await judge(ring, guard_b, b, settings, header("other"), "10.2.2.2", CHAT)))
        await b._sync()  # B's copy: refused without Redis too
        assert revocation_tag(entry.digest) in guard_b.revoked
        out.append(outcome(verdict(ring, guard_b, settings, header("other"), "10.2.2.3", CHAT)))
        a.keys_changed([], [entry.digest])  # the key is back in A's file
        await a._send_changes()
        await b._sync()
        out.append(outcome(await judge(ring, guard_b, b, settings, header("other"), "10.2.2.2", CHAT)))
        assert not guard_b.revoked
        raw = await a.redis.zrange(REVOKED, 0, -1)
        assert entry.digest.hex().encode() not in raw  # Redis never holds the keys file's digest
        await a.close()
        await b.close()
        return out

    out = asyncio.run(run())
    assert out[0][0] == "in"
    assert out[1][1:3] == (401, "revoked_api_key")
    assert out[2][1:3] == (401, "revoked_api_key")
    assert out[3][0] == "in"


def test_revocations_outlive_a_redis_that_lost_its_data(tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis restarted without persistence (the manifests' Redis) or flushed: each replica sends back the revoked
    set it knew, so a removed key stays refused on the replicas whose file still has it."""
    ring, guard_b, settings = world(tmp_path)
    entry = next(e for e in ring.entries if e.key_id == "other")

    async def run() -> tuple[object, ...]:
        a, b = shared_for(settings, redis_server.url), shared_for(settings, redis_server.url)
        b.on_revoked = lambda tags: setattr(guard_b, "revoked", tags)
        a.keys_changed([entry.digest], [])
        await a._send_changes()
        await b._sync()
        await b.redis.flushall()
        await b._sync()  # B finds the set gone and sends back what it knew
        assert await b.redis.zrange(REVOKED, 0, -1) == [revocation_tag(entry.digest).encode()]
        await a._sync()
        result = outcome(await judge(ring, guard_b, b, settings, header("other"), "10.4.4.4", CHAT))
        await a.close()
        await b.close()
        return result

    assert asyncio.run(run())[1:3] == (401, "revoked_api_key")


def test_a_redis_that_is_gone_is_a_fallback_at_once_and_comes_back(tmp_path: Path) -> None:
    ring, guard, settings = world(tmp_path)
    server = RedisServer(tmp_path / "redis")
    server.port = free_port()

    async def run() -> None:
        shared = shared_for(settings, server.url, timeout=0.2)
        await shared.start()  # nothing listens yet
        assert not shared.up
        started = time.monotonic()
        result = await judge(ring, guard, shared, settings, header("good"), "10.3.3.3", CHAT)
        assert isinstance(result, Admitted) and result.decision is not None and result.decision.remaining == 4
        assert time.monotonic() - started < 0.05  # down: no Redis call at all
        assert shared.fallbacks == 1
        server.start()
        await shared._probe()
        assert shared.up
        result = await judge(ring, guard, shared, settings, header("good"), "10.3.3.3", CHAT)
        assert isinstance(result, Admitted) and result.decision is not None
        assert result.decision.remaining == 4  # the shared window: this replica's local one was not sent
        server.kill()
        started = time.monotonic()
        result = await judge(ring, guard, shared, settings, header("good"), "10.3.3.3", CHAT)
        assert time.monotonic() - started < 1.0  # a failed call: judged locally, at once
        assert isinstance(result, Admitted) and not shared.up
        await shared.close()

    try:
        asyncio.run(run())
    finally:
        server.kill()


def test_a_wedged_redis_costs_a_request_at_most_the_timeout(tmp_path: Path) -> None:
    """A Redis that accepts connections and never answers (a stuck primary): REDIS_TIMEOUT bounds the wait."""
    ring, guard, settings = world(tmp_path)

    async def run() -> float:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1 << 20)
            await asyncio.sleep(30)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        shared = shared_for(settings, f"redis://127.0.0.1:{port}/0", timeout=0.1)
        started = time.monotonic()
        result = await judge(ring, guard, shared, settings, header("good"), "10.4.4.4", CHAT)
        took = time.monotonic() - started
        assert isinstance(result, Admitted) and not shared.up
        server.close()
        await shared.close()
        return took

    assert asyncio.run(run()) < 0.5


@pytest.mark.parametrize("url", ["redis://:secret@127.0.0.1:1/0"])
def test_the_warning_never_shows_the_url_or_its_password(tmp_path: Path, url: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    ring, guard, settings = world(tmp_path)

    async def run() -> None:
        shared = shared_for(settings, url, timeout=0.2)
        await judge(ring, guard, shared, settings, header("good"), "10.5.5.5", CHAT)
        await shared.close()

    with caplog.at_level("WARNING", logger="gateway.shared"):
        asyncio.run(run())
    assert "cannot be reached" in caplog.text
    assert "secret" not in caplog.text
