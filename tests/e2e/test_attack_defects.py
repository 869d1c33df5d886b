"""Regression tests for the defects an adversarial probe found (issue 10), through both lanes.

Most run against the fast stand-in backend (bench/fake_llama_server.py): the real model is not the point here.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import Gateway
from tests.e2e.test_fast_lane import Reader, request

KEY = "sk-fast-0123456789abcdef"  # what tests.e2e.test_fast_lane.request() sends
OTHER = "sk-other-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]
BENCH_FAKE = ROOT / "bench" / "fake_llama_server.py"
STALL_FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
LANES = ["true", "false"]
KEYS_DIR = Path(tempfile.mkdtemp(prefix="attack-keys-"))
DEEP = b"[" * 20_000 + b"]" * 20_000  # deep enough to exhaust Python's parser, small enough to arrive in one read
CHAT = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def lane_gateway(make_gateway, lane: str, name: str, **env: str) -> Gateway:  # type: ignore[no-untyped-def]
    keys = KEYS_DIR / "api_keys.txt"
    if not keys.exists():
        KEYS_DIR.mkdir(parents=True, exist_ok=True)
        keys.write_text(f"fast:{KEY}\nother:{OTHER}\n")
        keys.chmod(0o600)
    return make_gateway({"FAST_LANE": lane, "LLAMA_SERVER_BIN": str(BENCH_FAKE), "AUTH_ENABLED": "true",
                         "AUTH_KEYS_FILE": str(keys), "AUTH_FAILURE_LIMIT": "1000", "LOG_FORMAT": "json",
                         "MAX_REQUESTS_PER_MINUTE": "100000", **env}, name=f"{name}-{lane}")


def raw(gw: Gateway, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` and read until the gateway closes the connection (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := sock.recv(65536):
                got += chunk
        return got


def answers(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every whole answer in `data`, in order."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    reader = Reader(socket.socket())
    with contextlib.suppress(Exception):
        reader.parser.feed_data(data)
    for answer in reader.done:
        out.append((answer.status, answer.headers, answer.body))
    return out


def health(gw: Gateway) -> dict:
    return requests.get(f"{gw.url}/health", timeout=10).json()


def access_records(gw: Gateway) -> list[dict]:
    requests.get(f"{gw.url}/metrics", timeout=10)  # a scrape flushes the batched access log
    log = gw.data_dir / "logs" / "llama" / "access.log"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture(params=LANES)
def gw(request: pytest.FixtureRequest, make_gateway) -> Iterator[Gateway]:  # type: ignore[no-untyped-def]
    yield lane_gateway(make_gateway, request.param, "attack", CLIENT_TIMEOUT="2", MAX_CONCURRENT_REQUESTS="2",
                       PARALLEL="2", MAX_TOKENS="64", EXTRA_ARGS="--stream-chunks 200000")


# --- 1. chunked trailers ----------------------------------------------------------------------------------------


def test_chunked_trailers_never_reach_the_next_request(gw: Gateway) -> None:
    """A trailer `Authorization` (or `Origin`) on a chunked request must not become the next request's."""
    body = json.dumps(CHAT).encode()
    chunked = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {OTHER}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + b"%x\r\n%b\r\n0\r\nAuthorization: Bearer %b\r\nOrigin: https://evil.example\r\n\r\n" % (
        len(body), body, KEY.encode())
    follow = b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n"  # no key of its own
    got = answers(raw(gw, chunked + follow))
    assert got[0][0] == 200
    assert got[0][1].get("connection", "").lower() == "close"
    assert all(status != 200 for status, _, _ in got[1:]), "the next request ran under the trailer's key"
    assert all("access-control-allow-origin" not in headers for _, headers, _ in got)


# --- 3. a client that never reads ------------------------------------------------------------------------------


def test_a_client_that_never_reads_its_stream_is_dropped_and_frees_its_slot(gw: Gateway) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    stream = json.dumps({**CHAT, "stream": True}).encode()
    with sock:
        sock.sendall(request(body=stream))
        deadline = time.monotonic() + 5
        while health(gw)["queue"]["active"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        seen = health(gw)
        assert seen["queue"]["active"] == 1
        deadline = time.monotonic() + 15  # CLIENT_TIMEOUT=2 once the gateway's buffers are full
        while health(gw)["queue"]["active"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health(gw)["queue"]["active"] == 0, "a client that never reads still holds a backend slot"
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(1 << 20):
                pass  # the gateway dropped the connection: the reads end
    assert requests.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {KEY}"},
                         timeout=10).status_code == 200


def test_health_says_when_every_slot_is_held(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(STALL_FAKE), "FAKE_MODE": "stall_stream", "FAKE_STALL": "3",
                                "MAX_CONCURRENT_REQUESTS": "2", "PARALLEL": "2"}, name="saturated")
    assert health(gw)["status"] == "ok"
    held = threading.Thread(target=lambda: requests.post(
        f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True, "n": 2}, timeout=30).content)
    held.start()  # one request with n=2 takes both slots
    deadline = time.monotonic() + 5
    while health(gw)["status"] != "saturated" and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = health(gw)
    assert seen["status"] == "saturated" and seen["queue"]["active"] == 2
    held.join(30)
    assert health(gw)["status"] == "ok"


# --- 4. header floods and the connection cap -------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("lane", LANES)
def test_unfinished_header_floods_hold_little_memory(make_gateway, lane: str) -> None:  # type: ignore[no-untyped-def]
    gw = lane_gateway(make_gateway, lane, "flood")
    assert gw.proc is not None
    base = rss_kib(gw.proc.pid)
    line = b"X-Pad-%03d: " + b"a" * 8000 + b"\r\n"
    socks = []
    try:
        for _ in range(40):
            sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
            socks.append(sock)
            with contextlib.suppress(OSError):  # refused with a 431 and closed once past the limits
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\n")
                for i in range(250):
                    sock.sendall(line % i)
        time.sleep(0.5)
        grown = rss_kib(gw.proc.pid) - base
    finally:
        for sock in socks:
            sock.close()
    assert grown < 64 * 1024, f"40 unfinished header floods grew the gateway by {grown} KiB"
    got = answers(raw(gw, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n" + b"".join(line % i for i in range(70))
                      + b"\r\n"))
    assert got[0][0] == 431 and json.loads(got[0][2])["error"]["code"] == "headers_too_large"


@pytest.mark.parametrize("lane", LANES)
def test_connections_over_max_connections_get_503(make_gateway, lane: str) -> None:  # type: ignore[no-untyped-def]
    gw = lane_gateway(make_gateway, lane, "maxconn", MAX_CONNECTIONS="6")
    socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(6)]
    try:
        time.sleep(0.2)
        got = answers(raw(gw, request("/v1/models", None, method="GET")))
        assert got and got[0][0] == 503
        assert json.loads(got[0][2])["error"]["code"] == "too_many_connections"
    finally:
        for sock in socks:
            sock.close()
    time.sleep(0.3)
    got = answers(raw(gw, request("/v1/models", None, method="GET", headers={"Connection": "close"})))
    assert got[0][0] == 200
    assert requests.get(f"{gw.url}/metrics", timeout=10).json()["rejections"]["connections"] >= 1


# --- 5. request fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("n_probs", 100_000), ("dry_sequence_breakers", ["x"] * 3000), ("max_tokens", -5), ("max_tokens", 100_000),
    ("n", 8), ("top_logprobs", 50),
])
def test_unbounded_request_fields_get_a_400_naming_them(gw: Gateway, field: str, value: object) -> None:
    resp = requests.post(f"{gw.url}/v1/chat/completions", json={**CHAT, field: value},
                         headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("lane", LANES)
def test_a_backend_answer_over_max_response_size_is_a_502(make_gateway, lane: str) -> None:  # type: ignore[no-untyped-def]
    gw = lane_gateway(make_gateway, lane, "bigreply", MAX_RESPONSE_SIZE="2048", EXTRA_ARGS=f"--alias {'m' * 4000}")
    resp = requests.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == "backend_answer_too_large"
    again = requests.get(f"{gw.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert again.status_code == 502  # a connection dropped mid-answer is never reused out of step
    assert health(gw)["status"] == "ok"


# --- 7. bodies Python's json would pass on ---------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    b'{"messages": [], "temperature": NaN}', b'{"messages": [], "temperature": Infinity}',
    b'{"messages": [], "temperature": 1e400}', b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    '{"messages": []}'.encode("utf-16"), '{"messages": []}'.encode("utf-32"),
    DEEP,
], ids=["nan", "infinity", "1e400", "lone-surrogate", "utf-16", "utf-32", "deep"])
def test_bodies_json_would_pass_on_get_a_400(gw: Gateway, body: bytes) -> None:
    got = answers(raw(gw, request(body=body, headers={"Connection": "close"})))
    assert got[0][0] == 400, got[0][2]
    assert json.loads(got[0][2])["error"]["code"] == "invalid_json"
    assert "Traceback" not in gw.output()


def test_an_unauthenticated_body_is_refused_before_it_is_parsed(gw: Gateway) -> None:
    got = answers(raw(gw, request(body=DEEP, headers={"Authorization": "Bearer sk-nobody-0123456789", "Connection":
                                                      "close"})))
    assert got[0][0] == 401
    assert "Traceback" not in gw.output()


# --- 8. Connection: close and Host ------------------------------------------------------------------------------


def test_connection_close_is_honoured(gw: Gateway) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(request(headers={"Connection": "close"}))
        started = time.monotonic()
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        assert time.monotonic() - started < 1, "the connection stayed open after Connection: close"
    (answer,) = answers(got)
    assert answer[0] == 200
    assert answer[1].get("connection", "").lower() == "close"


@pytest.mark.parametrize("hosts", [[], ["a", "b"]], ids=["no-host", "two-hosts"])
def test_both_lanes_refuse_a_request_without_exactly_one_host(gw: Gateway, hosts: list[str]) -> None:
    body = json.dumps(CHAT).encode()
    head = ["POST /v1/chat/completions HTTP/1.1", *(f"Host: {h}" for h in hosts), f"Authorization: Bearer {KEY}",
            "Content-Type: application/json", f"Content-Length: {len(body)}"]
    got = answers(raw(gw, ("\r\n".join(head) + "\r\n\r\n").encode() + body))
    assert got[0][0] == 400
    assert "error" in json.loads(got[0][2])


# --- 9. aiohttp's own errors, clients that leave ---------------------------------------------------------------


def test_malformed_requests_get_json_that_does_not_echo_the_request(gw: Gateway) -> None:
    bad = f"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization Bearer {KEY}\r\n\r\n".encode()
    got = answers(raw(gw, bad))
    status, headers, body = got[0]
    assert status == 400 and headers["content-type"].startswith("application/json")
    assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert KEY.encode() not in body and KEY not in gw.output()
    assert headers.get("x-request-id")


def test_a_client_that_leaves_before_its_answer_is_logged_as_499(make_gateway) -> None:  # type: ignore[no-untyped-def]
    for lane in LANES:
        gw: Gateway = make_gateway({"FAST_LANE": lane, "LLAMA_SERVER_BIN": str(STALL_FAKE), "LOG_FORMAT": "json",
                                    "FAKE_MODE": "stall_stream", "FAKE_STALL": "5", "MAX_CONCURRENT_REQUESTS": "1",
                                    "PARALLEL": "1"}, name=f"leaves-{lane}")
        held = threading.Thread(target=lambda gw=gw: requests.post(
            f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True}, timeout=30).content)
        held.start()  # holds the one slot: the next request waits in the queue
        time.sleep(0.5)
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(request(headers={"Authorization": ""}))
            time.sleep(0.5)  # queued, then the client gives up
        held.join(30)
        deadline = time.monotonic() + 5
        while not any(r["status"] == 499 for r in access_records(gw)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [r["status"] for r in access_records(gw) if r["path"] == "/v1/chat/completions"].count(499) == 1, lane
        assert 'status="500"' not in requests.get(f"{gw.url}/metrics?format=prometheus", timeout=10).text
