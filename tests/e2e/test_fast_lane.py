"""The fast lane (gateway/fastlane.py) against the real backend: plain API calls are answered on it, everything else
is handed to aiohttp with its bytes, and the connection goes on working either way."""

from __future__ import annotations

import json
import random
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httptools
import pytest
import requests

from tests.conftest import Gateway

KEY = "sk-fast-0123456789abcdef"
ORIGIN = "https://app.example"
CHAT = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
STREAM = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                     "stream": True, "stream_options": {"include_usage": True}}).encode()
ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"


class Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.pieces: list[bytes] = []


class Reader:
    """Whole HTTP answers off a raw socket (interim 1xx answers included), with httptools."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.done: list[Answer] = []
        self.current = Answer()
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers[name.decode().lower()] = value.decode()

    def on_headers_complete(self) -> None:
        self.current.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        self.current.pieces.append(body)

    def on_message_complete(self) -> None:
        self.current.body = b"".join(self.current.pieces)
        self.done.append(self.current)
        self.current = Answer()

    def read(self, count: int = 1, timeout: float = 60) -> list[Answer]:
        deadline = time.monotonic() + timeout
        while len(self.done) < count:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.parser.feed_data(data)
        taken, self.done = self.done[:count], self.done[count:]
        return taken


def request(path: str = "/v1/chat/completions", body: bytes | None = CHAT, headers: dict[str, str] | None = None,
            method: str = "POST", version: str = "1.1") -> bytes:
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def counters(gw: Gateway) -> tuple[int, int]:
    """(requests answered on the fast lane, connections handed over before this probe's own)."""
    data = requests.get(f"{gw.url}/metrics", timeout=10).json()
    return data["requests_fast_lane"], data["connections_handed_over"] - 1


def handed_over_since(gw: Gateway, before: tuple[int, int]) -> tuple[int, int]:
    """(fast-lane answers, hand-overs) since `before` was read, not counting the probes."""
    now = counters(gw)
    return now[0] - before[0], now[1] - before[1] - 1


def connect(gw: Gateway) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    return sock, Reader(sock)


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("fast")
    (data / "api_keys.txt").write_text(f"fast:{KEY}\n")
    gw = Gateway(data, {"FAST_LANE": "true", "AUTH_ENABLED": "true", "CORS_ORIGINS": ORIGIN, "CLIENT_TIMEOUT": "1",
                        "MAX_REQUESTS_PER_MINUTE": "100000", "AUTH_FAILURE_LIMIT": "1000"}).start()
    yield gw
    gw.stop()


def test_plain_calls_are_answered_on_the_fast_lane_over_one_connection(fast: Gateway) -> None:
    before = counters(fast)
    sock, reader = connect(fast)
    with sock:
        for i in range(3):
            sock.sendall(request(headers={"X-Request-ID": f"fast-{i}"}))
            (answer,) = reader.read()
            assert answer.status == 200, answer.body
            assert json.loads(answer.body)["object"] == "chat.completion"
            assert answer.headers["x-request-id"] == f"fast-{i}"
            assert answer.headers["content-type"].startswith("application/json")
            assert int(answer.headers["content-length"]) == len(answer.body)
            assert answer.headers["x-ratelimit-limit"] == "100000"
            assert "date" in answer.headers
            assert "access-control-allow-origin" not in answer.headers
        sock.sendall(request("/v1/models", None, method="GET"))
        (models,) = reader.read()
        assert models.status == 200 and json.loads(models.body)["object"] == "list"
    assert handed_over_since(fast, before) == (4, 0)


def test_streams_are_relayed_on_the_fast_lane_and_the_connection_goes_on(fast: Gateway) -> None:
    before = counters(fast)
    sock, reader = connect(fast)
    with sock:
        sock.sendall(request(body=STREAM, headers={"X-Request-ID": "stream-1"}))
        (answer,) = reader.read()
        assert answer.status == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        assert answer.headers["transfer-encoding"] == "chunked"
        assert answer.headers["x-request-id"] == "stream-1"
        events = [line for line in answer.body.split(b"\n\n") if line.strip()]
        assert events[-1] == b"data: [DONE]"
        assert json.loads(events[-2].removeprefix(b"data: "))["usage"]["completion_tokens"] == 4
        sock.sendall(request())  # keep-alive after a stream, still on the fast lane
        (after,) = reader.read()
        assert after.status == 200
    assert handed_over_since(fast, before) == (2, 0)


def test_both_lanes_give_the_same_answer_headers(fast: Gateway, make_gateway) -> None:  # type: ignore[no-untyped-def]
    (fast.data_dir / "slow").mkdir(exist_ok=True)
    slow = make_gateway({"FAST_LANE": "false", "AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(fast.data_dir /
                         "api_keys.txt"), "MAX_REQUESTS_PER_MINUTE": "100000"}, name="slow")
    for body in (CHAT, STREAM):
        seen = []
        for gw in (fast, slow):
            sock, reader = connect(gw)
            with sock:
                sock.sendall(request(body=body, headers={"X-Request-ID": "same"}))
                (answer,) = reader.read()
            assert answer.status == 200
            seen.append(answer.headers)
        assert set(seen[0]) == set(seen[1])
        for name in ("content-type", "x-request-id", "x-ratelimit-limit", "server", "cache-control",
                     "transfer-encoding", "x-accel-buffering"):
            assert seen[0].get(name) == seen[1].get(name)
    assert json.loads(requests.get(f"{slow.url}/metrics", timeout=10).content)["requests_fast_lane"] == 0


HANDED_OVER = {
    "origin": (request(headers={"Origin": ORIGIN}), 200),
    "bad key": (request(headers={"Authorization": "Bearer sk-wrong"}), 401),
    "bad json": (request(body=b'{"messages": '), 400),
    "not an object": (request(body=b"[1, 2]"), 400),
    "query string": (request("/v1/chat/completions?x=1"), 200),
    "unknown route": (request("/v1/nothing"), 404),
    "chunked body": (request(body=None, headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
                     + b"%x\r\n" % len(CHAT) + CHAT + b"\r\n0\r\n\r\n", 200),
    "probe": (request("/health", None, method="GET"), 200),
    "two keys": (request().replace(b"Host: test\r\n", b"Host: test\r\nAuthorization: Bearer sk-wrong\r\n"), 401),
}


@pytest.mark.parametrize("case", list(HANDED_OVER))
def test_other_requests_are_handed_to_aiohttp_and_the_connection_goes_on(fast: Gateway, case: str) -> None:
    data, status = HANDED_OVER[case]
    before = counters(fast)
    sock, reader = connect(fast)
    with sock:
        sock.sendall(data)
        (answer,) = reader.read()
        assert answer.status == status, answer.body
        if case == "origin":
            assert answer.headers["access-control-allow-origin"] == ORIGIN
        if status >= 400:
            assert "error" in json.loads(answer.body)
        if case == "chunked body":  # a chunked request ends its connection (see test_chunked_trailers_*)
            assert answer.headers.get("connection", "").lower() == "close"
            assert handed_over_since(fast, before) == (0, 1)
            return
        sock.sendall(request())  # the same connection, now aiohttp's
        (after,) = reader.read()
        assert after.status == 200
    assert handed_over_since(fast, before) == (0, 1)  # both answers came from aiohttp


def test_a_request_sent_in_pieces_is_answered(fast: Gateway) -> None:
    sock, reader = connect(fast)
    with sock:
        data = request()
        sock.sendall(data[:40])
        time.sleep(0.2)
        sock.sendall(data[40:])
        (answer,) = reader.read()
        assert answer.status == 200


def test_headers_and_body_written_apart_still_take_the_fast_lane(fast: Gateway) -> None:
    """What the openai and anthropic clients (httpx), requests and http.client do: the head in one write, the body in
    the next. The fast lane waits (up to PIECES_WAIT) for the rest instead of handing the request over."""
    before = counters(fast)
    sock, reader = connect(fast)
    with sock:
        for i in range(3):
            data = request(headers={"X-Request-ID": f"apart-{i}"})
            cut = data.index(b"\r\n\r\n") + 4
            sock.sendall(data[:cut])
            time.sleep(0.05)
            sock.sendall(data[cut:])
            (answer,) = reader.read()
            assert answer.status == 200 and answer.headers["x-request-id"] == f"apart-{i}"
    assert handed_over_since(fast, before) == (3, 0)


def test_a_body_that_never_comes_is_handed_to_aiohttp_which_times_it_out(fast: Gateway) -> None:
    before = counters(fast)
    sock, reader = connect(fast)
    with sock:
        data = request()
        sock.sendall(data[: data.index(b"\r\n\r\n") + 4])  # the head alone
        (answer,) = reader.read()
        assert answer.status == 408  # aiohttp's lane, after CLIENT_TIMEOUT=1
    assert handed_over_since(fast, before) == (0, 1)


def test_pipelined_requests_are_answered_in_order(fast: Gateway) -> None:
    sock, reader = connect(fast)
    with sock:
        sock.sendall(request())  # the first on the fast lane, then two sent back to back while it runs
        sock.sendall(request(headers={"X-Request-ID": "p1"}) + request(headers={"X-Request-ID": "p2"}))
        answers = reader.read(3)
    assert [a.status for a in answers] == [200, 200, 200]
    assert [a.headers["x-request-id"] for a in answers[1:]] == ["p1", "p2"]


def test_expect_100_continue_is_honoured(fast: Gateway) -> None:
    sock, reader = connect(fast)
    with sock:
        head = request(body=CHAT, headers={"Expect": "100-continue"})[: -len(CHAT)]
        sock.sendall(head)
        (interim,) = reader.read()
        assert interim.status == 100
        sock.sendall(CHAT)
        (answer,) = reader.read()
        assert answer.status == 200


def test_http_1_0_is_answered_and_closed(fast: Gateway) -> None:
    sock, reader = connect(fast)
    with sock:
        sock.sendall(request(version="1.0"))
        (answer,) = reader.read()
        assert answer.status == 200
        sock.settimeout(5)
        assert sock.recv(100) == b""


def test_an_idle_fast_lane_connection_is_closed_after_client_timeout(fast: Gateway) -> None:
    before = counters(fast)
    sock, reader = connect(fast)
    with sock:
        sock.sendall(request())
        (answer,) = reader.read()
        assert answer.status == 200
        sock.settimeout(5)
        started = time.monotonic()
        assert sock.recv(100) == b""  # CLIENT_TIMEOUT=1
        assert 0.5 < time.monotonic() - started < 4
    assert handed_over_since(fast, before) == (1, 0)


def test_any_mix_of_pieces_and_pipelining_is_answered_in_order(fast: Gateway) -> None:
    """Random cuts through a run of requests (fast-lane ones and ones aiohttp must take): every request is answered
    once, in order, whichever lane saw it."""
    rng = random.Random(7)
    kinds = [{}, {"Origin": ORIGIN}, {"Authorization": "Bearer sk-wrong"}]
    for attempt in range(6):
        sock, reader = connect(fast)
        with sock:
            ids, stream = [], b""
            for i in range(5):
                rid = f"mix-{attempt}-{i}"
                ids.append(rid)
                stream += request(headers={"X-Request-ID": rid, **rng.choice(kinds)})
            cuts = sorted(rng.sample(range(1, len(stream)), 4))
            for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
                sock.sendall(stream[start:end])
                time.sleep(rng.choice([0, 0.01, 0.05]))
            answers = reader.read(5)
        assert [a.headers["x-request-id"] for a in answers] == ids
        assert all(a.status in (200, 401) for a in answers)


def test_sigterm_lets_fast_lane_requests_finish_and_closes_idle_connections(make_gateway) -> None:  # type: ignore[no-untyped-def]
    """A whole answer and a stream in flight (the fake backend holds each for 2 s) both finish during the drain."""
    gw: Gateway = make_gateway({"FAST_LANE": "true", "DRAIN_TIMEOUT": "60", "LLAMA_SERVER_BIN": str(FAKE),
                                "FAKE_MODE": "stall_stream", "FAKE_STALL": "2"}, name="fast-drain")
    before = counters(gw)
    idle, idle_reader = connect(gw)
    whole, whole_reader = connect(gw)
    streamed, streamed_reader = connect(gw)
    with idle, whole, streamed:
        idle.sendall(request("/v1/models", None, method="GET"))
        idle_reader.read()  # (the fake answers 503 to anything but /health: passed on as it is)
        whole.sendall(request())
        streamed.sendall(request(body=STREAM))
        deadline = time.monotonic() + 10
        while requests.get(f"{gw.url}/health", timeout=5).json()["queue"]["active"] != 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert counters(gw)[0] - before[0] == 3  # all three on the fast lane
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        (answer,) = whole_reader.read(timeout=30)
        (events,) = streamed_reader.read(timeout=30)
        assert answer.status == 200 and b"[DONE]" in answer.body  # drained, not cut off
        assert events.status == 200 and events.body.rstrip().endswith(b"data: [DONE]")
        assert gw.proc.wait(30) == 0
        idle.settimeout(5)
        assert idle.recv(100) == b""
    assert "draining 2 in-flight request(s)" in gw.output()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("fast_lane", ["true", "false"])  # both lanes: gateway/fastlane.py and aiohttp's
def test_a_client_that_reads_slowly_holds_the_stream_back(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    """About 20 MB of events from a fast backend to a client that stops reading: the gateway keeps only a bounded
    buffer (it stops reading from the backend), and the whole stream still arrives once the client reads again."""
    fake = ROOT / "bench" / "fake_llama_server.py"
    gw: Gateway = make_gateway({"FAST_LANE": fast_lane, "LLAMA_SERVER_BIN": str(fake),
                                "EXTRA_ARGS": "--stream-chunks 100000"}, name=f"slow-reader-{fast_lane}")
    assert gw.proc is not None
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    with sock:
        base = rss_kib(gw.proc.pid)
        sock.sendall(request(body=STREAM))
        first = sock.recv(100)
        assert first.startswith(b"HTTP/1.1 200")
        time.sleep(2)  # not reading: the backend has written everything by now
        grown = rss_kib(gw.proc.pid) - base
        assert grown < 8 * 1024, f"the gateway buffered {grown} KiB for a client that does not read"
        reader = Reader(sock)
        reader.parser.feed_data(first)
        (answer,) = reader.read(timeout=60)
    assert answer.body.rstrip().endswith(b"data: [DONE]")
    assert b'"tok99999 "' in answer.body
