"""Request ids: the client's X-Request-ID when it is safe to echo and log, a fresh one otherwise."""

from __future__ import annotations

import re
import secrets

HEADER = "X-Request-ID"
MAX_LENGTH = 128

_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]+")


def new_request_id() -> str:
    return secrets.token_hex(12)


def request_id(header_value: str | None) -> str:
    """The id for this request: the header kept to [A-Za-z0-9._:-] and 128 characters, or a new 24-hex-digit id.

    Ids end up in response headers and log lines, so anything else (spaces, quotes, newlines, non-ASCII) is dropped.
    """
    if not header_value:
        return new_request_id()
    if _SAFE.fullmatch(header_value):  # the usual case: a well-behaved client or proxy
        return header_value
    cleaned = _UNSAFE.sub("", header_value)[:MAX_LENGTH]
    return cleaned or new_request_id()
