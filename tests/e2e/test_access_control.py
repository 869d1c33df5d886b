"""Access control and request hygiene against a running gateway with the real backend."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from gateway.keys import main as keys_cli
from tests.conftest import Gateway

PROD = "sk-prod-0123456789abcdef"
LIMITED = "sk-limited-0123456789abcdef"
EXPIRED = "sk-expired-0123456789abcdef"
RELOAD = "sk-reload-0123456789abcdef"
ORIGIN = "https://app.example"
CHAT = {"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, capsys_module: None) -> Iterator[tuple[Gateway, dict]]:
    data = tmp_path_factory.mktemp("secured")
    keys = data / "api_keys.txt"
    keys.write_text(
        "# seed-format keys\n"
        f"prod:{PROD} admin=true\n"
        f"limited:{LIMITED}:3\n"
        f"expired:{EXPIRED}::2020-01-01T00:00:00\n"
        f"reloadme:{RELOAD}:4\n"
    )
    gw = Gateway(data, {
        "AUTH_ENABLED": "true", "CORS_ORIGINS": ORIGIN, "AUTH_FAILURE_LIMIT": "1000",
        "MAX_REQUEST_BODY_SIZE": "4000", "MAX_HEADERS": "20", "MAX_HEADER_LINE_SIZE": "1024",
        "CLIENT_TIMEOUT": "1",
    }).start()
    yield gw, {"keys": keys}
    gw.stop()


@pytest.fixture(scope="module")
def capsys_module() -> None:
    return None


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def post(gw: Gateway, key: str | None, **kwargs: object) -> requests.Response:
    headers = {**(auth(key) if key else {}), **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    return requests.post(f"{gw.url}/v1/chat/completions", json=kwargs.pop("json", CHAT), headers=headers,
                         timeout=30, **kwargs)  # type: ignore[arg-type]


# --- keys ------------------------------------------------------------------------------------------


def test_bearer_and_bare_keys(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    assert post(gw, PROD).status_code == 200
    bare = requests.get(f"{gw.url}/v1/models", headers={"Authorization": PROD}, timeout=10)
    assert bare.status_code == 200
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=PROD, max_retries=0)
    assert client.models.list().data


@pytest.mark.parametrize(("key", "code"), [(None, "missing_api_key"), ("sk-wrong-0123456789abcdef", "invalid_api_key"),
                                           (EXPIRED, "expired_api_key")])
def test_bad_keys_get_401(secured, key: str | None, code: str) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    resp = post(gw, key)
    assert resp.status_code == 401
    assert resp.json()["error"] == {"message": resp.json()["error"]["message"], "type": "authentication_error",
                                    "code": code}


def test_public_paths_need_no_key(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    for path in ("/ping", "/health", "/health?x", "/ping?verbose=1", "/metrics", "/metrics?format=json"):
        assert requests.get(gw.url + path, timeout=5).status_code == 200, path
    assert requests.get(f"http://127.0.0.1:{gw.port_health}/anything", timeout=5).status_code == 200
    assert requests.get(f"http://127.0.0.1:{gw.port_health}/ping", timeout=5).status_code == 200  # model loaded
    assert requests.get(f"{gw.url}/v1/models?x=1", timeout=5).status_code == 401


def test_metrics_can_require_a_key(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "k.txt"
    keys.write_text(f"ops:{PROD} routes=metrics\napp:{LIMITED}\n")
    gw = make_gateway({"AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys), "METRICS_AUTH_ENABLED": "true"},
                      name="metrics-auth")
    assert requests.get(f"{gw.url}/metrics", timeout=5).status_code == 401
    assert requests.get(f"{gw.url}/metrics", headers=auth(PROD), timeout=5).status_code == 200
    refused = requests.get(f"{gw.url}/metrics", headers=auth(LIMITED), timeout=5)  # the metrics group it lacks
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "route_not_allowed"
    assert "route group metrics" in refused.json()["error"]["message"]
    assert requests.get(f"{gw.url}/health", timeout=5).status_code == 200


def test_hashed_key_written_by_the_cli_works(secured, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    gw, files = secured
    assert keys_cli(["--file", str(files["keys"]), "generate", "--name", "cli-made", "--quiet"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-")
    assert key not in files["keys"].read_text()
    deadline = time.monotonic() + 5  # picked up by the file watcher, no restart
    while post(gw, key).status_code != 200:
        assert time.monotonic() < deadline, "the new key was not picked up"
        time.sleep(0.2)


# --- hot reload ------------------------------------------------------------------------------------


def test_reload_on_sighup_and_post(secured) -> None:  # type: ignore[no-untyped-def]
    gw, files = secured
    # Rate-limit state survives reloads: spend 3 of reloadme's 4 requests per minute first.
    for _ in range(3):
        assert requests.get(f"{gw.url}/v1/models", headers=auth(RELOAD), timeout=5).status_code == 200
    new_key = "sk-sighup-0123456789abcdef"
    with files["keys"].open("a") as fh:
        fh.write(f"sighup:{new_key}\n")
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while requests.get(f"{gw.url}/v1/models", headers=auth(new_key), timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert requests.post(f"{gw.url}/reload", timeout=5).status_code == 401
    not_admin = requests.post(f"{gw.url}/reload", headers=auth(RELOAD), timeout=5)  # an admin action now
    assert not_admin.status_code == 403 and not_admin.json()["error"]["code"] == "admin_key_required"
    reloaded = requests.post(f"{gw.url}/reload", headers=auth(PROD), timeout=5)
    assert reloaded.status_code == 200 and reloaded.json()["keys"] >= 5
    assert requests.get(f"{gw.url}/v1/models", headers=auth(RELOAD), timeout=5).status_code == 200
    assert requests.get(f"{gw.url}/v1/models", headers=auth(RELOAD), timeout=5).status_code == 429


# --- rate limits ----------------------------------------------------------------------------------------


def test_rate_limit_per_key_with_headers(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    seen = [requests.get(f"{gw.url}/v1/models", headers=auth(LIMITED), timeout=5) for _ in range(4)]
    assert [r.status_code for r in seen] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in seen[:3]] == ["2", "1", "0"]
    refused = seen[3]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["X-RateLimit-Limit"] == "3"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert int(refused.headers["X-RateLimit-Reset"]) <= 60
    assert post(gw, PROD).status_code == 200  # other keys are unaffected


def test_failed_keys_from_one_address_are_slowed_down(make_gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "k.txt"
    keys.write_text(f"prod:{PROD}\n")
    gw = make_gateway({"AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys), "AUTH_FAILURE_LIMIT": "3"},
                      name="guess")
    codes = [requests.get(f"{gw.url}/v1/models", headers=auth(f"sk-guess-{i:020d}"), timeout=5).status_code
             for i in range(5)]
    assert codes == [401, 401, 401, 429, 429]
    blocked = requests.get(f"{gw.url}/v1/models", headers=auth(PROD), timeout=5)
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) >= 1


# --- CORS --------------------------------------------------------------------------------------------------


def test_cors_preflight_echoes_requested_headers(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    requested = "authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-retry-count"
    resp = requests.options(f"{gw.url}/v1/chat/completions", timeout=5, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": requested})
    assert resp.status_code == 204
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert resp.headers["Access-Control-Allow-Headers"] == requested
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert int(resp.headers["Access-Control-Max-Age"]) > 0
    assert "Origin" in resp.headers["Vary"]


def test_cors_headers_on_answers_and_errors_for_allowed_origin_only(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    ok = post(gw, PROD, headers={"Origin": ORIGIN})
    assert ok.status_code == 200 and ok.headers["Access-Control-Allow-Origin"] == ORIGIN
    denied = post(gw, None, headers={"Origin": ORIGIN})
    assert denied.status_code == 401 and denied.headers["Access-Control-Allow-Origin"] == ORIGIN
    stream = post(gw, PROD, headers={"Origin": ORIGIN}, json={**CHAT, "stream": True})
    assert stream.headers["Access-Control-Allow-Origin"] == ORIGIN
    for resp in (post(gw, PROD, headers={"Origin": "https://evil.example"}), post(gw, PROD)):
        assert not [h for h in resp.headers if h.lower().startswith("access-control-")]
    evil = requests.options(f"{gw.url}/v1/chat/completions", timeout=5, headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert not [h for h in evil.headers if h.lower().startswith("access-control-")]


# --- limits ------------------------------------------------------------------------------------------------


def test_body_limits(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    big = b'{"x": "' + b"a" * 5000 + b'"}'
    declared = requests.post(f"{gw.url}/v1/chat/completions", data=big, headers=auth(PROD), timeout=10)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    chunked = requests.post(f"{gw.url}/v1/chat/completions", data=iter([big[:3000], big[3000:]]),
                            headers=auth(PROD), timeout=10)
    assert chunked.status_code == 413
    bad = requests.post(f"{gw.url}/v1/chat/completions", data=b"{nope", headers=auth(PROD), timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


def test_header_and_request_line_limits(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    many = {f"X-Extra-{i}": "1" for i in range(25)}
    assert requests.get(f"{gw.url}/ping", headers=many, timeout=5).status_code == 431
    long_line = requests.get(f"{gw.url}/ping", headers={"X-Long": "a" * 2000}, timeout=5)
    assert long_line.status_code == 431 and long_line.json()["error"]["code"] == "headers_too_large"
    long_url = requests.get(f"{gw.url}/ping?q={'a' * 9000}", timeout=5)
    assert long_url.status_code == 414


def _raw(gw: Gateway, data: bytes, wait: float) -> bytes:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=wait) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_stalled_body_times_out(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {PROD}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":").encode()
    start = time.monotonic()
    answer = _raw(gw, head, wait=10)
    assert answer.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - start < 8
    assert requests.get(f"{gw.url}/health", timeout=5).json()["queue"]["active"] == 0


# --- only what should be reachable, and no secrets -----------------------------------------------------------


def test_backend_internals_are_not_reachable(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    for path in ("/slots", "/props", "/", "/index.html", "/metrics/../slots", "/v1/../slots", "/completion"):
        resp = requests.get(gw.url + path, headers=auth(PROD), timeout=5)
        assert resp.status_code == 404, path
        assert "error" in resp.json()


def test_passthrough_routes_open_a_backend_route(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"PASSTHROUGH_ROUTES": "/props,/lora-adapters"}, name="passthrough")
    props = requests.get(f"{gw.url}/props", timeout=10)
    assert props.status_code == 200 and "default_generation_settings" in props.json()
    assert requests.get(f"{gw.url}/lora-adapters", timeout=10).json() == []
    assert requests.post(f"{gw.url}/lora-adapters", json=[{"id": 0, "scale": 1}], timeout=10).status_code == 405
    assert requests.get(f"{gw.url}/slots", timeout=5).status_code == 404


def test_keys_never_leak(secured) -> None:  # type: ignore[no-untyped-def]
    gw, files = secured
    post(gw, "sk-leaky-0123456789abcdef")
    requests.get(f"{gw.url}/ping", headers={"Authorization": "Bearer " + "sk-toolong" * 200}, timeout=5)
    bodies = requests.get(f"{gw.url}/health", timeout=5).text + requests.get(f"{gw.url}/metrics", timeout=5).text
    logs = gw.output() + "".join(p.read_text(errors="replace") for p in (gw.data_dir / "logs").rglob("*.log"))
    for secret in (PROD, LIMITED, EXPIRED, RELOAD, "sk-leaky-0123456789abcdef", "sk-toolong"):
        assert secret not in bodies
        assert secret not in logs
    assert "key_id=limited" in logs  # the key_id is what logs name
    assert os.stat(files["keys"]).st_size > 0


def test_stalled_headers_are_dropped(secured) -> None:  # type: ignore[no-untyped-def]
    gw, _ = secured
    start = time.monotonic()
    answer = _raw(gw, b"GET /ping HTTP/1.1\r\nHost: x\r\n", wait=15)
    assert answer == b""  # closed without an answer
    assert time.monotonic() - start < 10
