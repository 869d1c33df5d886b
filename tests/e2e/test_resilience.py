"""Faults against the real backend: crashes, clients that leave, a full queue, timeouts, SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, Gateway, pid_alive

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
LONG = {"model": "any", "prompt": "Write a very long story:", "max_tokens": 3000, "ignore_eos": True,
        "temperature": 0.8}


def open_stream(gw: Gateway, body: dict | None = None) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**(body or LONG), "stream": True}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # generation is under way
    return conn, resp


def wait_for(check, timeout: float, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(interval)


def health(gw: Gateway) -> dict:
    return requests.get(f"{gw.url}/health", timeout=5).json()


def test_backend_killed_mid_stream(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"BACKEND_RESTART_DELAY": "0.2"}, name="crash")
    (backend,) = gw.backend_pids()
    conn, resp = open_stream(gw)
    started = time.monotonic()
    os.kill(backend, signal.SIGKILL)
    rest = resp.read()  # the stream ends by itself
    assert time.monotonic() - started < 5
    events = [e for e in rest.split(b"\n\n") if e.strip()]
    error = json.loads(events[-1].strip().removeprefix(b"data: "))["error"]
    assert error["code"] == "backend_error" and "broke off" in error["message"]
    assert b"HTTP/1.1" not in rest  # never a second status line
    conn.close()
    assert gw.proc is not None and gw.proc.poll() is None  # the gateway lives
    refused = requests.post(f"{gw.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert refused.status_code in (200, 503)
    if refused.status_code == 503:
        assert refused.json()["error"]["code"] == "backend_unavailable" and refused.headers["Retry-After"]
    # the supervisor notices the exit when it reaps the child, which can come after the stream broke off
    wait_for(lambda: health(gw)["restarts"] == 1, 60)
    assert health(gw)["backend"] == "ready"
    reply = requests.post(f"{gw.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert reply.status_code == 200
    assert not pid_alive(backend)


def test_aborted_streams_free_every_slot(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"PARALLEL": "10", "CTX": "8192", "PASSTHROUGH_ROUTES": "/slots"}, name="abort")
    streams = [open_stream(gw, {**LONG, "max_tokens": 500}) for _ in range(10)]
    slots = requests.get(f"{gw.url}/slots", timeout=5).json()
    assert sum(1 for s in slots if s["is_processing"]) >= 8
    for conn, resp in streams:
        resp.close()
        conn.close()
    aborted = time.monotonic()
    wait_for(lambda: not any(s["is_processing"] for s in requests.get(f"{gw.url}/slots", timeout=5).json()), 5)
    assert time.monotonic() - aborted < 1.0
    assert health(gw)["queue"]["active"] == 0


@pytest.mark.parametrize("fast_lane", ["true", "false"])  # both lanes: gateway/fastlane.py and aiohttp's
def test_queue_full_and_queue_timeout(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "1", "QUEUE_TIMEOUT": "1",
                                "FAST_LANE": fast_lane},
                               name="queue")
    conn, resp = open_stream(gw)  # holds the only slot
    queued: dict[str, requests.Response] = {}
    waiter = threading.Thread(target=lambda: queued.setdefault("r", requests.post(
        f"{gw.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)))
    waiter.start()
    wait_for(lambda: health(gw)["queue"]["depth"] == 1, 5)
    full = requests.post(f"{gw.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
    assert full.status_code == 503
    assert full.json()["error"]["code"] == "queue_full" and int(full.headers["Retry-After"]) >= 1
    assert requests.get(f"{gw.url}/v1/models", timeout=5).status_code == 200  # light routes are not queued
    waiter.join(10)
    timed_out = queued["r"]
    assert timed_out.status_code == 503
    assert timed_out.json()["error"]["code"] == "queue_timeout" and int(timed_out.headers["Retry-After"]) >= 1
    metrics = requests.get(f"{gw.url}/metrics", timeout=5).json()
    assert metrics["queue_rejections"] == 2
    resp.close()
    conn.close()


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_queued_client_that_leaves_frees_its_place(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"MAX_CONCURRENT_REQUESTS": "1", "QUEUE_TIMEOUT": "30", "FAST_LANE": fast_lane},
                               name="leave")
    conn, resp = open_stream(gw)
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    sock = socket.create_connection(("127.0.0.1", gw.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: health(gw)["queue"]["depth"] == 1, 5)
    sock.close()
    left = time.monotonic()
    wait_for(lambda: health(gw)["queue"]["depth"] == 0, 5, interval=0.01)
    assert time.monotonic() - left < 0.5
    resp.close()
    conn.close()
    reply = requests.post(f"{gw.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert reply.status_code == 200  # the slot came back


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_request_timeout_is_504(make_gateway, fast_lane: str) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"REQUEST_TIMEOUT": "0.5", "PASSTHROUGH_ROUTES": "/slots", "FAST_LANE": fast_lane},
                               name="timeout")
    started = time.monotonic()
    resp = requests.post(f"{gw.url}/v1/completions", json=LONG, timeout=30)
    assert resp.status_code == 504 and resp.json()["error"]["code"] == "backend_timeout"
    assert time.monotonic() - started < 3
    # The upstream connection was closed. llama-server notices once a second (HTTP_POLLING_SECONDS) while no
    # result of any task arrives, so polling /slots often would itself delay the check: look once, after 2.5 s.
    time.sleep(2.5)
    assert not any(s["is_processing"] for s in requests.get(f"{gw.url}/slots", timeout=5).json())


def test_stream_idle_timeout_is_reported_inside_the_stream(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "stall_stream", "FAKE_STALL": "3",
                                "STREAM_IDLE_TIMEOUT": "0.5"}, name="idle")
    resp = requests.post(f"{gw.url}/v1/chat/completions", timeout=30,
                         json={"model": "any", "messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert resp.status_code == 200
    events = [e for e in resp.content.split(b"\n\n") if e.strip()]
    assert b'"content":"hi"' in events[0]
    assert json.loads(events[-1].strip().removeprefix(b"data: "))["error"]["code"] == "backend_timeout"
    assert resp.elapsed.total_seconds() < 2.5


def test_sigterm_drains_a_stream_then_exits_zero(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"DRAIN_TIMEOUT": "30"}, name="drain")
    (backend,) = gw.backend_pids()
    conn, resp = open_stream(gw, {**LONG, "max_tokens": 120})
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: requests.get(f"{gw.url}/health", timeout=5).status_code == 503, 5)
    assert requests.get(f"{gw.url}/health", timeout=5).json()["status"] == "draining"
    assert requests.get(f"http://127.0.0.1:{gw.port_health}/", timeout=5).status_code == 503
    refused = requests.post(f"{gw.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    rest = resp.read()
    assert rest.rstrip().endswith(b"data: [DONE]")  # the in-flight stream completed
    conn.close()
    assert gw.proc.wait(30) == 0
    assert not pid_alive(backend)


def test_crash_loop_exits_for_the_platform(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "crash_after_ready",
                                "FAKE_CRASH_AFTER": "1.0", "BACKEND_RESTART_LIMIT": "3",
                                "BACKEND_RESTART_DELAY": "0.1"}, name="loop-exit")
    assert gw.proc is not None
    assert gw.proc.wait(30) == 1
    assert "crash loop" in gw.output()
    boot = "".join(p.read_text() for p in (gw.data_dir / "logs" / "_boot").glob("*.log"))
    assert "exited unexpectedly with code 9" in boot


def test_crash_loop_with_retry_policy_reports_down(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw: Gateway = make_gateway({"LLAMA_SERVER_BIN": str(FAKE), "FAKE_MODE": "crash_after_ready",
                                "FAKE_CRASH_AFTER": "1.0", "BACKEND_RESTART_LIMIT": "3", "BACKEND_CRASH_LOOP": "retry",
                                "BACKEND_RESTART_DELAY": "0.1", "BACKEND_RESTART_MAX_DELAY": "30"}, name="loop-retry")
    down = wait_for(lambda: (h := health(gw))["backend"] == "down" and h, 30)
    assert "exited unexpectedly with code 9" in down["error"]
    assert any("fake llama-server" in line for line in down["log_tail"])
    assert requests.get(f"{gw.url}/health", timeout=5).status_code == 503
    assert gw.proc is not None and gw.proc.poll() is None  # still there, still retrying
    assert Path(gw.data_dir / "logs" / "llama").is_dir()
