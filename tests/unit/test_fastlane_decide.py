"""gateway.fastlane.decide: the fast lane's pure take-or-hand-over choice."""

from __future__ import annotations

import pytest

from gateway.fastlane import Candidate, LaneLimits, decide

LIMITS = LaneLimits({b"/v1/chat/completions": "/v1/chat/completions"}, {b"/v1/models": "/v1/models"},
                    max_headers=8, max_line=100, max_body=50)
BODY = [b'{"messages": []}']
BASE = [(b"Host", b"x"), (b"Content-Length", b"16"), (b"Authorization", b"Bearer k")]


def look(version: str = "1.1", keep_alive: bool = True, method: bytes = b"POST", url: bytes = b"/v1/chat/completions",
         headers: list[tuple[bytes, bytes]] | None = None, body: list[bytes] | None = None,
         ready: bool = True) -> Candidate | str:
    return decide(LIMITS, version, keep_alive, method, url, BASE if headers is None else headers,
                  BODY if body is None else body, ready)


def test_a_plain_post_is_taken() -> None:
    assert look() == Candidate("POST", "/v1/chat/completions", "Bearer k", None, b'{"messages": []}')


def test_a_plain_get_is_taken() -> None:
    assert look(method=b"GET", url=b"/v1/models", headers=[(b"Host", b"x"), (b"X-Request-ID", b"r1")],
                body=[]) == Candidate("GET", "/v1/models", "", "r1", None)


@pytest.mark.parametrize(("change", "why"), [
    ({"version": "1.0"}, "keep-alive"),
    ({"keep_alive": False}, "keep-alive"),
    ({"url": b"/v1/chat/completions?x=1"}, "route"),
    ({"url": b"/v1/other"}, "route"),
    ({"method": b"PUT"}, "route"),
    ({"ready": False}, "not ready"),
    ({"headers": [*BASE, (b"Origin", b"https://a")]}, "origin"),
    ({"headers": [*BASE, (b"Expect", b"100-continue")]}, "expect"),
    ({"headers": [*BASE, (b"Transfer-Encoding", b"chunked")]}, "transfer-encoding"),
    ({"headers": [*BASE, (b"Upgrade", b"h2c")]}, "upgrade"),
    ({"headers": [*BASE, (b"Access-Control-Request-Method", b"POST")]}, "access-control"),
    ({"headers": [*BASE, (b"authorization", b"Bearer j")]}, "Authorization twice"),
    ({"headers": [*BASE, (b"X-Request-ID", b"a"), (b"x-request-id", b"b")]}, "X-Request-ID twice"),
    ({"headers": [*BASE, (b"content-length", b"16")]}, "Content-Length twice"),
    ({"headers": BASE[1:]}, "Host"),
    ({"headers": [*BASE, (b"Host", b"y")]}, "Host"),
    ({"headers": BASE + [(b"X-A", b"1")] * 6}, "MAX_HEADERS"),
    ({"headers": [*BASE, (b"X-Long", b"v" * 100)]}, "MAX_HEADER_LINE_SIZE"),
    ({"headers": [(b"Host", b"x"), (b"Content-Length", b"16"), (b"Authorization", b"Bearer \xff")]}, "ASCII"),
    ({"headers": [(b"Host", b"x")]}, "Content-Length"),
    ({"body": [b"x" * 51]}, "MAX_REQUEST_BODY_SIZE"),
    ({"method": b"GET", "url": b"/v1/models", "headers": [(b"Host", b"x")], "body": [b"x"]}, "GET with a body"),
])
def test_everything_else_is_handed_over_with_a_reason(change: dict, why: str) -> None:
    reason = look(**change)
    assert isinstance(reason, str) and why.lower() in reason.lower(), reason


def test_it_is_pure() -> None:
    headers = list(BASE)
    body = list(BODY)
    assert look(headers=headers, body=body) == look(headers=headers, body=body)
    assert headers == BASE and body == BODY
