"""What the gateway answers itself: probes, health, metrics, errors, the health port."""

from __future__ import annotations

import requests

from tests.conftest import Gateway


def test_ping(gateway: Gateway) -> None:
    resp = requests.get(f"{gateway.url}/ping", timeout=5)
    assert resp.status_code == 200


def test_health_reports_ready_backend(gateway: Gateway) -> None:
    resp = requests.get(f"{gateway.url}/health", timeout=5)
    assert resp.status_code == 200
    body = resp.json()
    assert body["backend"] == "ready"
    assert body["model"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert body["slots"] == 4
    assert "queue" in body


def test_metrics_json_counts_requests(gateway: Gateway) -> None:
    before = requests.get(f"{gateway.url}/metrics", timeout=5).json()
    requests.get(f"{gateway.url}/v1/models", timeout=10)
    requests.post(f"{gateway.url}/v1/chat/completions", data=b"{not json", timeout=10)
    after = requests.get(f"{gateway.url}/metrics", timeout=5).json()
    assert after["requests_total"] == before["requests_total"] + 2
    assert after["requests_success"] == before["requests_success"] + 1
    assert after["requests_error"] == before["requests_error"] + 1
    for field in ("requests_active", "queue_depth", "queue_rejections", "uptime_seconds"):
        assert field in after


def test_malformed_json_is_rejected_by_the_gateway(gateway: Gateway) -> None:
    for body in (b"{bad", b"", b"\xff\xfe", b"[1, 2]"):
        resp = requests.post(f"{gateway.url}/v1/chat/completions", data=body,
                             headers={"Content-Type": "application/json"}, timeout=10)
        assert resp.status_code == 400, body
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_json"


def test_unknown_route_is_an_openai_error(gateway: Gateway) -> None:
    resp = requests.get(f"{gateway.url}/v1/nope", timeout=5)
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"
    resp = requests.get(f"{gateway.url}/v1/chat/completions", timeout=5)
    assert resp.status_code == 405
    assert "error" in resp.json()


def test_backend_cors_headers_never_leak(gateway: Gateway) -> None:
    resp = requests.post(f"{gateway.url}/v1/chat/completions", timeout=30,
                         headers={"Origin": "https://evil.example"},
                         json={"model": "any", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert resp.status_code == 200
    assert not any(h.lower().startswith("access-control-") for h in resp.headers)


def test_body_over_limit_is_413(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"MAX_REQUEST_BODY_SIZE": "1000"}, name="small")
    resp = requests.post(f"{gw.url}/v1/chat/completions", data=b"{" + b" " * 5000 + b"}",
                         headers={"Content-Type": "application/json"}, timeout=10)
    assert resp.status_code == 413
    assert resp.json()["error"]["code"] == "request_too_large"


def test_health_port_answers_any_path(gateway: Gateway) -> None:
    base = f"http://127.0.0.1:{gateway.port_health}"
    for path in ("/", "/ping", "/health", "/anything/at/all?x=1"):
        assert requests.get(base + path, timeout=5).status_code == 200
        assert requests.head(base + path, timeout=5).status_code == 200


def test_gateway_log_is_clean(gateway: Gateway) -> None:
    requests.get(f"{gateway.url}/ping", timeout=5)
    output = gateway.output()
    assert "misconfiguration" not in output
    assert "Traceback" not in output
