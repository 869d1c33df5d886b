"""Request ids: the client's X-Request-ID when it is safe to echo and log, a fresh one otherwise."""

from __future__ import annotations

import itertools
import re
import secrets

HEADER = "X-Request-ID"
MAX_LENGTH = 128

_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]+")


class RequestIds:
    """Makes request ids; one per app. A new id is a random per-process prefix and a counter (24 hex digits):
    unique, and with no system call on the hot path."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count()

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFF:08x}"

    def __call__(self, header_value: str | None) -> str:
        """The id for this request: the header kept to [A-Za-z0-9._:-] and 128 characters, or a new one.

        Ids end up in response headers and log lines, so anything else (spaces, quotes, newlines, non-ASCII) is
        dropped.
        """
        if not header_value:
            return self.new()
        if _SAFE.fullmatch(header_value):  # the usual case: a well-behaved client or proxy
            return header_value
        cleaned = _UNSAFE.sub("", header_value)[:MAX_LENGTH]
        return cleaned or self.new()
