"""Parity of the two lanes: for a generated corpus of requests, a gateway with the fast lane answers each exactly as
one without it (aiohttp's lane alone) does: status, error code and the headers that matter. A request the fast
lane does not take is handed to aiohttp, so either way the answers must agree."""

from __future__ import annotations

import json
import random
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway
from tests.e2e.test_attack_defects import BENCH_FAKE, answers

GOOD = "sk-parity-good-0123456789"
EXPIRED = "sk-parity-expired-0123456789"
LIMITED = "sk-parity-limited-0123456789"
ORIGIN = "https://app.example"
MATTERS = ("content-type", "access-control-allow-origin", "access-control-allow-credentials", "retry-after",
           "x-ratelimit-limit", "x-ratelimit-remaining", "connection", "x-request-id")
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()


@pytest.fixture(scope="module")
def lanes() -> Iterator[tuple[Gateway, Gateway]]:
    work = Path(tempfile.mkdtemp(prefix="parity-"))
    keys = work / "api_keys.txt"
    keys.write_text(f"good:{GOOD}\nold:{EXPIRED}::2020-01-01\nlimited:{LIMITED}:3\n")
    keys.chmod(0o600)
    env = {"LLAMA_SERVER_BIN": str(BENCH_FAKE), "AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys),
           "CORS_ORIGINS": ORIGIN, "AUTH_FAILURE_LIMIT": "100000", "MAX_REQUESTS_PER_MINUTE": "100000",
           "MAX_HEADERS": "24", "MAX_HEADER_LINE_SIZE": "600", "MAX_TOKENS": "64"}
    fast = Gateway(work / "fast", {**env, "FAST_LANE": "true"}).start(timeout=60)
    slow = Gateway(work / "slow", {**env, "FAST_LANE": "false"}).start(timeout=60)
    yield fast, slow
    fast.stop()
    slow.stop()


def request(rng: random.Random, index: int) -> bytes:
    """One request of the corpus: a random mix of route, key, Origin, framing, body and header spelling."""
    path = rng.choice(["/v1/chat/completions"] * 4 + ["/v1/models", "/v1/models", "/v1/nothing", "/health",
                                                     "/v1/chat/completions?x=1"])
    method = "GET" if path in ("/v1/models", "/health") else "POST"
    key = rng.choice([GOOD, GOOD, GOOD, EXPIRED, LIMITED, "sk-unknown-0123456789", None, "\u00ff\u00fe"])
    body = None
    if method == "POST":
        body = rng.choice([CHAT, CHAT, CHAT, b'{"messages": ', b"[1]", b'{"max_tokens": 100000}', b'{"n_probs": 99}',
                           b'{"temperature": NaN}'])
    name = rng.choice(["Authorization", "authorization", "AUTHORIZATION"])
    lines = [f"{method} {path} HTTP/1.1", "Host: parity", f"X-Request-ID: parity-{index}"]
    if key is not None:
        lines.append(f"{name}: Bearer {key}")
    origin = rng.choice([None, None, ORIGIN, "https://evil.example"])
    if origin:
        lines.append(f"Origin: {origin}")
    if rng.random() < 0.1:
        lines += [f"X-Pad-{i}: v" for i in range(30)]  # past MAX_HEADERS
    if rng.random() < 0.05:
        lines.append("X-Long: " + "v" * 700)  # past MAX_HEADER_LINE_SIZE
    if rng.random() < 0.1:
        lines.append("Connection: close")
    head_only = body is None
    if body is not None and rng.random() < 0.15:
        lines.append("Transfer-Encoding: chunked")
        data = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    else:
        if not head_only:
            lines.append(f"Content-Length: {len(body or b'')}")
        data = body or b""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def exchange(gw: Gateway, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as sock:
        sock.sendall(data)
        got = b""
        sock.settimeout(3)
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
                if len(answers(got)) >= data.count(b" HTTP/1.1\r\n"):
                    break
        except TimeoutError:
            pass
    return answers(got)


def essence(answer: tuple[int, dict[str, str], bytes]) -> dict[str, object]:
    status, headers, body = answer
    code = None
    if headers.get("content-type", "").startswith("application/json") and status >= 400:
        code = json.loads(body).get("error", {}).get("code")
    seen: dict[str, object] = {"status": status, "code": code, **{name: headers.get(name) for name in MATTERS}}
    rid = headers.get("x-request-id", "")
    seen["x-request-id"] = "echoed" if rid.startswith("parity-") else "fresh" if rid else None  # fresh ids differ
    return seen


def test_both_lanes_answer_a_generated_corpus_alike(lanes: tuple[Gateway, Gateway]) -> None:
    fast, slow = lanes
    rng = random.Random(20261202)
    corpus = [request(rng, i) for i in range(120)]
    corpus += [request(rng, 1000 + i) + request(rng, 2000 + i) for i in range(10)]  # pipelined pairs
    for data in corpus:
        seen_fast, seen_slow = exchange(fast, data), exchange(slow, data)
        assert seen_slow, data[:200]
        assert [essence(a) for a in seen_fast] == [essence(a) for a in seen_slow], data[:300]
    counted = json.loads(__import__("requests").get(f"{fast.url}/metrics", timeout=10).content)
    assert counted["requests_fast_lane"] >= 5  # the corpus did exercise the fast lane (6 of its plain requests)
