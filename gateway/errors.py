"""Everything the gateway says itself is an OpenAI-shaped JSON error with the right status."""

from __future__ import annotations

import json

from aiohttp import web

INTERNAL_ERROR = "internal error in the gateway; see its log"  # the message of every 500 the gateway gives itself
CLIENT_CLOSED = 499  # nginx's status for a client that left before its answer went out (access log, metrics)

# status -> (type, default code)
_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    431: ("invalid_request_error", "headers_too_large"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "backend_error"),
    503: ("server_error", "backend_unavailable"),
    504: ("server_error", "backend_timeout"),
}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> bytes:
    kind, default_code = _KINDS.get(status, ("server_error" if status >= 500 else "invalid_request_error", "error"))
    error: dict[str, str] = {"message": message, "type": kind, "code": code or default_code}
    if param is not None:
        error["param"] = param  # the request field at fault, as OpenAI names it
    return json.dumps({"error": error}).encode()


def error_response(
    status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
    param: str | None = None,
) -> web.Response:
    return web.Response(
        status=status, body=error_body(status, message, code, param), content_type="application/json",
        headers=headers,
    )


def sse_error_event(message: str, code: str = "backend_error") -> bytes:
    """How a failure is reported once a stream has started: an SSE event, never a second status line."""
    return b"data: " + error_body(502, message, code) + b"\n\n"
