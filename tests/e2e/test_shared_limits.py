"""REDIS_URL end to end: three gateway processes (two fast lanes, one aiohttp lane) against the fake backend and a
real redis-server share one key's rate limit exactly, refuse a key removed through one of them within a second,
fall back to their own limits without a hang when Redis is killed (revoked keys stay refused), and share again when
it is back."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, Gateway, RedisServer
from tests.e2e.test_attack_defects import BENCH_FAKE

KEYS = {
    "limited": "sk-shared-limited-0123456789",
    "victim": "sk-shared-victim-0123456789",
    "busy": "sk-shared-busy-0123456789",
    "local": "sk-shared-local-0123456789",
    "again": "sk-shared-again-0123456789",
    "rotor": "sk-shared-rotor-0123456789",
    "ops": "sk-shared-ops-0123456789",
}
LINES = ("limited:{limited}:12\nvictim:{victim}\nbusy:{busy}\nlocal:{local}:2\nagain:{again}:3\nrotor:{rotor}\n"
         "ops:{ops} admin=true\n").format(**KEYS)
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
REDIS_TIMEOUT = 0.5  # a loaded 2-core box; the default is 0.1 s


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[list[Gateway], RedisServer]]:
    work = Path(tempfile.mkdtemp(prefix="shared-"))
    redis = RedisServer(work / "redis").start()
    gateways = []
    for i, fast in enumerate(("true", "false", "true")):
        keys = work / f"keys{i}.txt"  # each replica its own copy of the file, as with a Secret per pod
        keys.write_text(LINES)
        keys.chmod(0o600)
        env = {"LLAMA_SERVER_BIN": str(BENCH_FAKE), "AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys),
               "REDIS_URL": redis.url, "REDIS_TIMEOUT": str(REDIS_TIMEOUT), "FAST_LANE": fast,
               "MAX_REQUESTS_PER_MINUTE": "100000", "EXTRA_ARGS": "--stream-chunks 2"}
        gateways.append(Gateway(work / f"gw{i}", env))
    try:
        for gw in gateways:
            gw.start(timeout=60)
        yield gateways, redis
    finally:
        for gw in gateways:
            gw.stop()
        redis.kill()


def post(gw: Gateway, key: str) -> requests.Response:
    return requests.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEYS[key]}"},
                         timeout=30)


def shared_state(gw: Gateway) -> dict:
    return requests.get(gw.url + "/health", timeout=5).json()["shared_limits"]


def wait_for(condition, timeout: float, step: float = 0.05) -> float:  # type: ignore[no-untyped-def]
    """Seconds until condition() held; fails after `timeout`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "not within the time allowed"
        time.sleep(step)
    return time.monotonic() - started


def test_one_keys_limit_is_held_exactly_across_the_replicas(cluster: tuple[list[Gateway], RedisServer]) -> None:
    gateways, _ = cluster
    assert all(shared_state(gw) == {"redis": "up", "limits": "shared", "fallbacks": 0} for gw in gateways)
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda i: post(gateways[i % 3], "limited").status_code, range(30)))
    assert sorted(codes) == [200] * 12 + [429] * 18  # 12 a minute in all, not 12 on each
    for gw in gateways:  # each replica refuses, whichever served the 12
        refused = post(gw, "limited")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_key_removed_through_one_replica_is_refused_by_all_within_a_second(
    cluster: tuple[list[Gateway], RedisServer],
) -> None:
    gateways, _ = cluster
    assert all(post(gw, "victim").status_code == 200 for gw in gateways)
    subprocess.run([sys.executable, "-m", "gateway.keys", "remove", "--name", "victim", "--file",
                    gateways[0].env["AUTH_KEYS_FILE"]], cwd=ROOT, check=True, capture_output=True, timeout=30)
    reload = requests.post(gateways[0].url + "/reload", headers={"Authorization": f"Bearer {KEYS['ops']}"}, timeout=10)
    assert reload.status_code == 200, reload.text
    removed = time.monotonic()
    for gw in gateways[1:]:  # their own files still hold the key
        wait_for(lambda gw=gw: post(gw, "victim").status_code == 401,
                 timeout=max(0.1, 1.0 - (time.monotonic() - removed)))
    assert time.monotonic() - removed <= 1.0
    refused = post(gateways[2], "victim").json()["error"]
    assert refused["code"] == "revoked_api_key" and refused["message"] == "this API key has been revoked"
    assert post(gateways[1], "busy").status_code == 200  # other keys are not touched


def test_a_key_rotated_on_one_replica_is_refused_by_all_and_its_new_key_works(
    cluster: tuple[list[Gateway], RedisServer],
) -> None:
    gateways, _ = cluster
    assert all(post(gw, "rotor").status_code == 200 for gw in gateways)
    rotated = subprocess.run([sys.executable, "-m", "gateway.keys", "rotate", "--name", "rotor", "-q", "--file",
                              gateways[1].env["AUTH_KEYS_FILE"]], cwd=ROOT, check=True, capture_output=True,
                             text=True, timeout=30)
    new_key = rotated.stdout.strip()
    assert new_key.startswith("sk-") and new_key != KEYS["rotor"]
    # no reload call this time: replica 1's file watcher (once a second) finds the change, then the others follow
    wait_for(lambda: all(post(gw, "rotor").status_code == 401 for gw in gateways), timeout=3)
    assert post(gateways[0], "rotor").json()["error"]["code"] == "revoked_api_key"
    fresh = requests.post(gateways[1].url + "/v1/chat/completions", json=CHAT, timeout=30,
                          headers={"Authorization": f"Bearer {new_key}"})
    assert fresh.status_code == 200  # the new key, in replica 1's file, is not caught by the old one's revocation


def test_redis_killed_mid_load_falls_back_without_a_hang_and_comes_back(
    cluster: tuple[list[Gateway], RedisServer],
) -> None:
    gateways, redis = cluster
    stop_at = time.monotonic() + 3.0
    killed: list[float] = []

    def load(i: int) -> list[tuple[int, float]]:
        out = []
        while time.monotonic() < stop_at:
            started = time.monotonic()
            code = post(gateways[i % 3], "busy").status_code
            out.append((code, time.monotonic() - started))
        return out

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(load, i) for i in range(6)]
        time.sleep(1.0)
        redis.kill()
        killed.append(time.monotonic())
        results = [r for f in futures for r in f.result(timeout=30)]
    assert results and {code for code, _ in results} == {200}  # every request answered, none refused for Redis
    assert max(seconds for _, seconds in results) < REDIS_TIMEOUT + 2.0  # no hang: bounded by the Redis timeout

    for gw in gateways:
        wait_for(lambda gw=gw: shared_state(gw)["redis"] == "unreachable", timeout=5)
        state = shared_state(gw)
        assert state["limits"] == "this replica only" and state["fallbacks"] > 0
        prom = requests.get(gw.url + "/metrics?format=prometheus", timeout=5).text
        assert "gateway_shared_limits_up 0.0" in prom
        assert "Redis at REDIS_URL cannot be reached" in gw.output()
        assert "sk-shared" not in gw.output()  # and never a key
    # the per-replica windows: 2 a minute on each replica now
    assert [post(gw, "local").status_code for gw in gateways for _ in range(3)] == [200, 200, 429] * 3
    # revoked before the outage: still refused, by the replicas whose file has the key too
    for gw in gateways:
        refused = post(gw, "victim")
        assert refused.status_code == 401 and refused.json()["error"]["code"] in ("revoked_api_key", "invalid_api_key")
    assert post(gateways[1], "victim").json()["error"]["code"] == "revoked_api_key"

    redis.start()  # the same port, no data: the shared state comes back by itself
    for gw in gateways:
        wait_for(lambda gw=gw: shared_state(gw)["redis"] == "up", timeout=5)
        assert "reachable again" in gw.output()
    assert sorted(post(gateways[i % 3], "again").status_code for i in range(9)) == [200] * 3 + [429] * 6
    time.sleep(1.0)  # a sync: the revoked set was sent back by the replicas that knew it
    for gw in gateways[1:]:
        assert post(gw, "victim").json()["error"]["code"] == "revoked_api_key"
