"""The request size limits, one function each, for both lanes: aiohttp's lane answers them (414, 431, 413, in
gateway.app.check_limits); the fast lane hands every request that breaks one to it (gateway.fastlane.decide)."""

from __future__ import annotations

from collections.abc import Sequence

MAX_REQUEST_LINE = 8192


def header_problem(headers: Sequence[tuple[bytes, bytes]], max_headers: int, max_line: int) -> str | None:
    """What is wrong with the request's header block (the 431's message), or None: more than MAX_HEADERS lines, or
    one longer than MAX_HEADER_LINE_SIZE (name, ": " and value)."""
    if len(headers) > max_headers:
        return f"more than {max_headers} request headers (MAX_HEADERS)"
    for name, value in headers:
        if len(name) + len(value) + 2 > max_line:
            return f"a header line is longer than {max_line} bytes (MAX_HEADER_LINE_SIZE)"
    return None


def body_too_large(size: int, max_body: int) -> bool:
    return size > max_body
