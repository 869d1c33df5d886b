"""Token usage from llama-server's answers, read once per request in the batch (gateway.observe).

Only the tail of an answer is read: llama-server writes JSON keys sorted, so `timings` and `usage` are the last keys
of a response and sit in the last event of a stream. The gateway keeps the last TAIL_BYTES of a stream, and its
first HEAD_BYTES (StreamTail), and parses them once, at the end.

Every API shape counts the same way:
- OpenAI chat and completions: `usage.prompt_tokens`, `usage.completion_tokens`;
- OpenAI's Responses API: `usage.input_tokens` (cached tokens included), `usage.output_tokens`, in the answer or
  in the stream's `response.completed` event;
- Anthropic's Messages API: `usage.input_tokens` + `usage.cache_read_input_tokens` (cached ones counted apart),
  `usage.output_tokens`; in a stream the input counts come in the first event (`message_start`), the output count
  in the last (`message_delta`): hence the head.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import NamedTuple

TAIL_BYTES = 8192
HEAD_BYTES = 4096  # an Anthropic stream's message_start, with its input tokens, comes first


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
    return next(_objects_from_end(text, key), None)


def _objects_from_end(text: str, key: str) -> Iterator[dict[str, object]]:
    """Every `"key": {...}` object in text, the last first (see _last_object)."""
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
            yield value


def _count(obj: dict[str, object] | None, name: str) -> int | None:
    if obj is None:
        return None
    value = obj.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
        return None
    return int(value)


def _prompt(usage: dict[str, object]) -> int | None:
    prompt = _count(usage, "prompt_tokens")
    if prompt is None and (given := _count(usage, "input_tokens")) is not None:
        prompt = given + (_count(usage, "cache_read_input_tokens") or 0)  # Anthropic counts cached ones apart
    return prompt


def _completion(usage: dict[str, object]) -> int | None:
    completion = _count(usage, "completion_tokens")
    return completion if completion is not None else _count(usage, "output_tokens")


def _usage(data: bytes) -> Usage | None:
    text = data.decode("utf-8", "replace")
    prompt = completion = None
    for usage in _objects_from_end(text, "usage"):  # the last one that says, for each count
        if prompt is None:
            prompt = _prompt(usage)
        if completion is None:
            completion = _completion(usage)
        if prompt is not None and completion is not None:
            break
    timings = _last_object(text, "timings")
    if prompt is None and completion is None and timings is None:
        return None
    if prompt is None and timings is not None:
        # timings' prompt_n counts only the tokens evaluated; cache_n the ones reused from the cache
        prompt = (_count(timings, "prompt_n") or 0) + (_count(timings, "cache_n") or 0)
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
    return _usage(body[-TAIL_BYTES:])


def usage_from_sse(chunk_tail: bytes) -> Usage | None:
    """Usage from the last events of a stream (its last TAIL_BYTES suffice); None when they carry none.

    llama-server puts `usage` on its final chunk when the request set stream_options.include_usage, and `timings`
    on the final chunk always, so a stream without usage still yields its token counts.
    """
    return _usage(chunk_tail)


class StreamTail:
    """Keeps the first HEAD_BYTES and about the last TAIL_BYTES of a stream, at amortised O(chunk) cost per chunk."""

    __slots__ = ("buffer", "fed", "first_at", "head", "limit")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.head = b""
        self.fed = 0
        self.first_at: float | None = None  # when the first piece came (time.monotonic()), set by its reader

    def feed(self, chunk: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[:HEAD_BYTES - len(self.head)]
        self.fed += len(chunk)
        self.buffer += chunk
        if len(self.buffer) > 2 * self.limit:
            del self.buffer[:-self.limit]

    def __bytes__(self) -> bytes:
        tail = bytes(self.buffer[-self.limit:])
        if self.fed <= self.limit:
            return tail  # the whole stream
        return self.head + b"\n\n" + tail
