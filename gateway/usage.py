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

Cached prompt tokens (the part of the prompt llama-server reused from its KV cache) come from
`usage.prompt_tokens_details.cached_tokens` (OpenAI), `usage.input_tokens_details.cached_tokens` (Responses),
`usage.cache_read_input_tokens` (Anthropic), else `timings.cache_n`; llama-server sends all of them.

A stream the client cut short has no final event: usage_from_stream() counts its generated tokens from the events
relayed (StreamTail.events), one token per event that carries text (an estimate: llama-server sends one event per
token, but holds back a token that ends inside a UTF-8 character or might start a stop word). Its prompt tokens are
known only where its head says them (Anthropic's message_start); otherwise they count as 0.
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
    cached_tokens: int = 0  # prompt tokens reused from llama-server's cache (part of prompt_tokens)


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


def _cached(usage: dict[str, object]) -> int | None:
    for name in ("prompt_tokens_details", "input_tokens_details"):  # OpenAI, Responses
        details = usage.get(name)
        if isinstance(details, dict) and (cached := _count(details, "cached_tokens")) is not None:
            return cached
    return _count(usage, "cache_read_input_tokens")  # Anthropic


def _completion(usage: dict[str, object]) -> int | None:
    completion = _count(usage, "completion_tokens")
    return completion if completion is not None else _count(usage, "output_tokens")


def _usage(data: bytes) -> Usage | None:
    text = data.decode("utf-8", "replace")
    prompt = completion = cached = None
    for usage in _objects_from_end(text, "usage"):  # the last one that says, for each count
        if prompt is None:
            prompt = _prompt(usage)
            if prompt is not None:
                cached = _cached(usage)  # from the same object as the prompt count
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
    if cached is None:
        cached = _count(timings, "cache_n")
    predicted_ms = timings.get("predicted_ms") if timings is not None else None
    seconds = 0.0
    if isinstance(predicted_ms, int | float) and not isinstance(predicted_ms, bool) and predicted_ms > 0:
        seconds = predicted_ms / 1000.0
    return Usage(prompt or 0, completion or 0, seconds if math.isfinite(seconds) else 0.0, cached or 0)


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


# The last event of a stream that ran to its end, by API shape: OpenAI's (chat, completions), Anthropic's,
# the Responses API's, llama-server's native /completion. llama-server writes JSON compact with its keys sorted, so
# `type` ends the Responses API's (large) response.completed event, inside the tail.
_FINAL_EVENTS = (b"data: [DONE]", b'"type":"message_stop"', b'"type":"response.completed"', b'"stop":true')
_TEXT_FIELDS = ("content", "reasoning_content", "tool_calls")  # a chat delta that carries a token


def _finished(data: bytes) -> bool:
    return any(final in data for final in _FINAL_EVENTS)


def _carries_token(event: bytes) -> bool | None:
    """Whether one held SSE event carries a generated token; None when it is no event at all."""
    name = b""
    payload = None
    for line in event.split(b"\n"):
        if line.startswith(b"event:"):
            name = line[6:].strip()
        elif line.startswith(b"data:"):
            payload = line[5:].strip()
    if payload is None:
        return None
    if name:  # Anthropic's content_block_delta, the Responses API's response.*.delta
        return name.endswith(b"delta") and name != b"message_delta"
    if payload == b"[DONE]":
        return False
    try:
        obj = json.loads(payload)
    except ValueError:
        return True  # an event cut in two where the head or tail ends: from the middle of the stream
    if not isinstance(obj, dict):
        return False
    choices = obj.get("choices")
    if isinstance(choices, list):
        if not choices or not isinstance(choices[0], dict):
            return False  # the usage chunk
        delta = choices[0].get("delta")
        if isinstance(delta, dict):
            return any(delta.get(name) for name in _TEXT_FIELDS)  # not the opening {"role": "assistant"}
        return bool(choices[0].get("text"))  # completions
    if "content" in obj:  # llama-server's native /completion
        return obj.get("stop") is not True
    return False  # an error event (the gateway's own, after the backend broke off)


def generated_events(data: bytes, events: int) -> int:
    """Token-bearing events of a stream of `events` events, of which `data` (StreamTail's bytes) holds some: every
    held event is looked at, every event not held (the middle of a long stream) is a token."""
    held = framing = 0
    for event in data.split(b"\n\n"):
        token = _carries_token(event)
        if token is None:
            continue
        held += 1
        framing += not token
    return max(0, max(events, held) - framing)


def usage_from_stream(data: bytes, events: int = 0) -> Usage | None:
    """A stream's usage: usage_from_sse() when it ran to its end; for a stream cut short (no final event in
    `data`, `events` > 0 events relayed), its completion tokens are the token-bearing events relayed (or the count
    llama-server's last timings gave, when larger), and its prompt tokens what its head says."""
    usage = usage_from_sse(data)
    if events <= 0 or _finished(data):
        return usage
    generated = generated_events(data, events)
    if usage is None:
        return Usage(0, generated) if generated else None
    return usage._replace(completion_tokens=max(usage.completion_tokens, generated))


class StreamTail:
    """Keeps the first HEAD_BYTES and about the last TAIL_BYTES of a stream, at amortised O(chunk) cost per chunk;
    `events` counts its SSE `data:` lines (two bytes.count per chunk, no parsing)."""

    __slots__ = ("buffer", "events", "fed", "first_at", "head", "limit")

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.head = b""
        self.fed = 0
        self.events = 0
        self.first_at: float | None = None  # when the first piece came (time.monotonic()), set by its reader

    def feed(self, chunk: bytes) -> None:
        if len(self.head) < HEAD_BYTES:
            self.head += chunk[:HEAD_BYTES - len(self.head)]
        self.fed += len(chunk)
        # A JSON string holds no raw newline, so "\ndata:" is always a line; an event write starts a chunk.
        self.events += chunk.count(b"\ndata:") + chunk.startswith(b"data:")
        self.buffer += chunk
        if len(self.buffer) > 2 * self.limit:
            del self.buffer[:-self.limit]

    def __bytes__(self) -> bytes:
        if self.fed == len(self.buffer) and self.fed <= self.limit + HEAD_BYTES:
            return bytes(self.buffer)  # the whole stream (head and tail would overlap)
        return self.head + b"\n\n" + bytes(self.buffer[-self.limit:])
