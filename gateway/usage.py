"""Token usage from llama-server's answers, read once per request in the batch (gateway.observe).

Only the tail of an answer is read: llama-server writes JSON keys sorted, so `timings` and `usage` are the last keys
of a response and sit in the last event of a stream. The gateway keeps the last TAIL_BYTES of a stream
(StreamTail) and parses them once, at the end.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple

TAIL_BYTES = 8192


class Usage(NamedTuple):
    """Tokens of one answer; generation_seconds is llama-server's own generation time (0.0 when unknown)."""

    prompt_tokens: int
    completion_tokens: int
    generation_seconds: float = 0.0


_DECODER = json.JSONDecoder()


def _last_object(text: str, key: str) -> dict[str, object] | None:
    """The value of the last `"key": {...}` in text, skipping occurrences whose object is cut off or not an object.

    A JSON string cannot hold an unescaped quote, so `"key"` followed by `:` only matches a real key.
    """
    needle = f'"{key}"'
    end = len(text)
    while (i := text.rfind(needle, 0, end)) >= 0:
        end = i
        j = i + len(needle)
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        if j >= len(text) or text[j] != ":":
            continue
        j += 1
        while j < len(text) and text[j] in " \t\r\n":
            j += 1
        try:
            value, _ = _DECODER.raw_decode(text, j)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _count(obj: dict[str, object] | None, name: str) -> int | None:
    if obj is None:
        return None
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
        return None
    return int(value)


def _usage(tail: bytes) -> Usage | None:
    text = tail[-TAIL_BYTES:].decode("utf-8", "replace")
    usage = _last_object(text, "usage")
    timings = _last_object(text, "timings")
    if usage is None and timings is None:
        return None
    prompt = _count(usage, "prompt_tokens")
    if prompt is None and timings is not None:
        # timings' prompt_n counts only the tokens evaluated; cache_n the ones reused from the cache
        prompt = (_count(timings, "prompt_n") or 0) + (_count(timings, "cache_n") or 0)
    completion = _count(usage, "completion_tokens")
    if completion is None:
        completion = _count(timings, "predicted_n")
    predicted_ms = timings.get("predicted_ms") if timings is not None else None
    seconds = 0.0
    if isinstance(predicted_ms, int | float) and not isinstance(predicted_ms, bool) and predicted_ms > 0:
        seconds = predicted_ms / 1000.0
    return Usage(prompt or 0, completion or 0, seconds if math.isfinite(seconds) else 0.0)


def usage_from_json(body: bytes) -> Usage | None:
    """Usage of a whole (non-stream) OpenAI answer, read from its last TAIL_BYTES; None when it carries none.

    `usage` first, `timings` as the fallback for the token counts; generation time from timings.predicted_ms.
    """
    return _usage(body)


def usage_from_sse(chunk_tail: bytes) -> Usage | None:
    """Usage from the last events of a stream (its last TAIL_BYTES suffice); None when they carry none.

    llama-server puts `usage` on its final chunk when the request set stream_options.include_usage, and `timings`
    on the final chunk always, so a stream without usage still yields its token counts.
    """
    return _usage(chunk_tail)


class StreamTail:
    """Keeps about the last TAIL_BYTES of a stream, at amortised O(chunk) cost per chunk."""

    __slots__ = ("buffer", "first_at", "limit")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.first_at: float | None = None  # when the first piece came (time.monotonic()), set by its reader

    def feed(self, chunk: bytes) -> None:
        self.buffer += chunk
        if len(self.buffer) > 2 * self.limit:
            del self.buffer[:-self.limit]

    def __bytes__(self) -> bytes:
        return bytes(self.buffer[-self.limit:])
