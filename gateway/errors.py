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


def sse_error_event(message: str, code: str = "backend_error", shape: str = "openai") -> bytes:
    """How a failure is reported once a stream has started: an SSE event, never a second status line. Anthropic's
    clients read an `event: error` whose data is Anthropic's error object."""
    if shape == "anthropic":
        return b"event: error\ndata: " + anthropic_body(502, message) + b"\n\n"
    return b"data: " + error_body(502, message, code) + b"\n\n"


# Anthropic's error types by status (docs.anthropic.com, "Errors"); the SDK picks its exception by status alone.
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 529: "overloaded_error",
                    503: "overloaded_error"}


def anthropic_body(status: int, message: str) -> bytes:
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


def shaped(shape: str, status: int, body: bytes) -> bytes:
    """An error answer in the shape the route's clients read: OpenAI's (the gateway's own and llama-server's) as is,
    Anthropic's for the Messages API. The one rule both lanes apply (gateway.pipeline, gateway.app), idempotent."""
    if shape != "anthropic" or status < 400:
        return body
    try:
        parsed = json.loads(body)
    except ValueError:
        return anthropic_body(status, body.decode("utf-8", "replace")[:500] or f"HTTP {status}")
    if not isinstance(parsed, dict):
        return anthropic_body(status, f"HTTP {status}")
    if parsed.get("type") == "error":
        return body  # already Anthropic's
    error = parsed.get("error")
    message = error.get("message") if isinstance(error, dict) else error
    return anthropic_body(status, str(message) if message else f"HTTP {status}")
