"""Keys-file and key-header defects (issue 10) against a real gateway with auth on, in both lanes.

The backend is the fake llama-server (tests/fakes): a POST answers 200 at once with FAKE_STALL=0, which is all
these tests need to tell a key that works from one that does not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from gateway.keyfile import digest, parse_keys
from tests.conftest import Gateway

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
PLAIN = "sk-plain-0123456789abcdef"
OTHER = "sk-other-0123456789abcdef"
HASHED = "sk-hashed-0123456789abcdef"
LATIN1_KEY = b"sk-M\xfcller-0123456789abcdef"  # a plaintext key whose bytes are not UTF-8
CHAT = json.dumps({"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
LANES = [pytest.param("true", id="fast-lane"), pytest.param("false", id="aiohttp-lane")]


def keys_bytes() -> bytes:
    return (b"# owner: M\xfcller (Latin-1, not UTF-8)\n"
            + f"plain:{PLAIN}\nother:{OTHER}\nhashed:sha256:{digest(HASHED).hex()} admin=true\n".encode()
            + b"latin:" + LATIN1_KEY + b"\n")


def start(data: Path, fast_lane: str, **env: str) -> Gateway:
    return Gateway(data, {"AUTH_ENABLED": "true", "FAST_LANE": fast_lane, "LLAMA_SERVER_BIN": str(FAKE),
                          "FAKE_STALL": "0", "AUTH_FAILURE_LIMIT": "1000", **env}).start(timeout=60)


@pytest.fixture
def gateways() -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for gw in started:
        gw.stop()


def status(gw: Gateway, key: str) -> int:
    return requests.post(f"{gw.url}/v1/chat/completions", data=CHAT, timeout=10,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}).status_code


def wait_for(check, timeout: float) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.05)
    return time.monotonic() - started


def logs_of(data: Path, keys_file: Path) -> str:
    """Everything the gateway wrote: its stdout/stderr, the boot log, the access log (all but the keys file)."""
    texts = []
    for path in sorted(data.rglob("*")):
        if path.is_file() and not path.name.lstrip(".").startswith(keys_file.name):  # the file, its lock, temps
            texts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(texts)


def raw_post(gw: Gateway, key: bytes) -> tuple[int, dict[str, str], bytes]:
    """One POST with `Authorization: Bearer <key bytes>` exactly as given, on a raw socket: (status, headers, body).

    (No `Connection: close`: the fast lane currently ignores it and keeps the connection open.)"""
    body = CHAT.encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n" % (len(body), key))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            more = sock.recv(65536)
            if not more:
                raise ConnectionError(f"closed after {answer!r}")
            answer += more
        top, _, payload = answer.partition(b"\r\n\r\n")
        lines = top.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        while len(payload) < int(headers["content-length"]):
            more = sock.recv(65536)
            if not more:
                break
            payload += more
    return int(lines[0].split()[1]), headers, payload


@pytest.mark.parametrize("fast_lane", LANES)
def test_a_keys_file_with_a_byte_that_is_not_utf8(tmp_path: Path, gateways: list[Gateway], fast_lane: str) -> None:
    """It used to kill the gateway at start-up, fail open on revocation, 500 on /reload and leak every key into the
    logs on SIGHUP (the UnicodeDecodeError's repr quotes the whole file)."""
    data = tmp_path / "gw"
    data.mkdir()
    keys_file = data / "api_keys.txt"
    keys_file.write_bytes(keys_bytes())
    keys_file.chmod(0o644)
    stored = parse_keys(keys_bytes().decode("utf-8", "surrogateescape"))
    secrets = [PLAIN, OTHER, HASHED, *(e.digest.hex() for e in stored)]
    gw = start(data, fast_lane)
    gateways.append(gw)

    assert [status(gw, key) for key in (PLAIN, OTHER, HASHED)] == [200, 200, 200]
    code, _, body = raw_post(gw, LATIN1_KEY)  # a key is its bytes, in the file and in the header alike
    assert code == 200, body

    removed = subprocess.run([sys.executable, "-m", "gateway.keys", "--file", str(keys_file), "remove", "--name",
                              "plain"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                             env={**os.environ, "DATA_DIR": str(data)})  # its audit line next to the gateway's
    assert removed.returncode == 0 and "removed key 'plain'" in removed.stderr
    assert wait_for(lambda: status(gw, PLAIN) == 401, timeout=2.5) < 2.5
    assert status(gw, OTHER) == 200 and status(gw, HASHED) == 200

    loaded = gw.output().count("loaded 3 API key(s)")
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: gw.output().count("loaded 3 API key(s)") > loaded, timeout=10)
    reload = requests.post(f"{gw.url}/reload", headers={"Authorization": f"Bearer {HASHED}"}, timeout=10)
    assert reload.status_code == 200 and reload.json() == {"status": "reloaded", "keys": 3}
    assert status(gw, OTHER) == 200 and status(gw, PLAIN) == 401

    gw.stop()  # flushes the boot and access logs
    text = logs_of(data, keys_file)
    assert "SIGHUP: reloading the keys file" in text
    for secret in secrets:
        assert secret not in text
    assert "Traceback" not in text and "UnicodeDecodeError" not in text
    assert gw.output().count("has mode 0644") == 1  # warned once, not at every reload
    assert f"chmod 600 {keys_file}" in gw.output()


@pytest.mark.parametrize("fast_lane", LANES)
def test_an_authorization_header_that_is_not_utf8_is_a_401_and_a_failed_key(tmp_path: Path,
                                                                            gateways: list[Gateway],
                                                                            fast_lane: str) -> None:
    """It used to be aiohttp's plain-text 500 with a traceback in the log, and did not count as a failed key."""
    data = tmp_path / "gw"
    data.mkdir()
    (data / "api_keys.txt").write_text(f"other:{OTHER}\n")
    gw = start(data, fast_lane, AUTH_FAILURE_LIMIT="2")
    gateways.append(gw)

    assert raw_post(gw, OTHER.encode())[0] == 200
    for _ in range(2):
        code, headers, body = raw_post(gw, b"\xff\xfe-0123456789abcdef")
        assert code == 401 and headers["content-type"].startswith("application/json")
        error = json.loads(body)["error"]
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    code, headers, body = raw_post(gw, b"\xff\xfe-0123456789abcdef")  # both counted: this address is now blocked
    assert code == 429 and json.loads(body)["error"]["code"] == "too_many_auth_failures"
    assert int(headers["retry-after"]) >= 1
    assert raw_post(gw, OTHER.encode())[0] == 200  # but not for the key it was using (issue 16)
    assert "Traceback" not in gw.output() and "UnicodeEncodeError" not in gw.output()
