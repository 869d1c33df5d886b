"""gateway.cors and gateway.errors: the gateway's own CORS headers and OpenAI-shaped errors."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from gateway.cors import EXPOSE, Cors
from gateway.errors import CLIENT_CLOSED, error_body, error_response, sse_error_event


def preflight(origin: str, headers: str | None = None) -> web.Request:
    h = {"Origin": origin, "Access-Control-Request-Method": "POST"}
    if headers:
        h["Access-Control-Request-Headers"] = headers
    return make_mocked_request("OPTIONS", "/v1/chat/completions", headers=h)


def test_cors_off_any_and_a_list() -> None:
    assert not Cors(()).allowed("https://a")
    assert Cors(("*",)).allowed("https://anything")
    listed = Cors(("https://a",))
    assert listed.allowed("https://a") and not listed.allowed("https://b") and not listed.allowed(None)


def test_a_preflight_from_an_allowed_origin_echoes_the_requested_headers() -> None:
    response = Cors(("https://a",)).preflight(preflight("https://a", "authorization, x-stainless-os"))
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == "https://a"
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, x-stainless-os"
    assert Cors(("https://a",)).preflight(preflight("https://b")).status == 403


def test_answers_to_allowed_origins_only_get_cors_headers() -> None:
    cors = Cors(("https://a",))
    for origin, expected in (("https://a", "https://a"), ("https://b", None)):
        request = make_mocked_request("POST", "/v1/chat/completions", headers={"Origin": origin})
        response = web.Response(status=401)
        cors.decorate(request, response)
        assert response.headers.get("Access-Control-Allow-Origin") == expected
        if expected:
            assert response.headers["Access-Control-Expose-Headers"] == EXPOSE


def test_errors_are_openai_shaped() -> None:
    assert json.loads(error_body(429, "slow down")) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "code": "rate_limit_exceeded"}}
    assert json.loads(error_body(400, "bad", "invalid_request", param="n"))["error"]["param"] == "n"
    assert json.loads(error_body(418, "odd"))["error"]["type"] == "invalid_request_error"
    response = error_response(503, "later", headers={"Retry-After": "5"})
    assert response.status == 503 and response.headers["Retry-After"] == "5"
    assert response.content_type == "application/json"
    event = sse_error_event("broke off")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[6:])["error"]["code"] == "backend_error"
    assert CLIENT_CLOSED == 499
