#!/usr/bin/env python3
"""A tiny, fast stand-in for llama-server, so a benchmark measures the proxy in front of it, not the model.

Usable as LLAMA_SERVER_BIN: it takes llama-server's arguments (`--host --port -m -c -ngl --parallel
--api-key-file --alias ...`), ignores the ones it does not know, prints a `version:` line for `--version`, and
answers, with HTTP/1.1 keep-alive:

  GET  /health                 200 {"status":"ok"} (no key needed, as in llama-server)
  GET  /v1/models              the alias as the one model
  POST /v1/chat/completions    a small fixed completion; with "stream": true a short SSE stream
  POST /v1/completions         the same, completion-shaped

Every /v1/* request needs `Authorization: Bearer <key>` with a key from LLAMA_API_KEY, --api-key-file or --api-key.
Stdlib only (uvloop when importable). The HTTP parsing is deliberately minimal: Content-Length bodies only,
no chunked request bodies, which is all an OpenAI client or a proxy sends for these routes.

Extra, fake-only arguments: --exit-after SECONDS (stop by itself; a safety net for benchmarks),
--stream-chunks N (content events per stream, default 8) and --token-interval SECONDS (pace the stream's events
like a model generating tokens, so a proxy handles each event on its own; default 0: all at once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import cast

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
CONTENT = "Hello! I am a fake llama-server."

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large"}


def _response(status: int, body: bytes, content_type: bytes = b"application/json; charset=utf-8") -> bytes:
    head = (
        b"HTTP/1.1 %d %s\r\nServer: fake-llama-server\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        b"Keep-Alive: timeout=5, max=100000\r\n\r\n"
        % (status, _REASONS.get(status, "Error").encode(), content_type, len(body))
    )
    return head + body


def _error(status: int, message: str, kind: str) -> bytes:
    return _response(status, json.dumps({"error": {"code": status, "message": message, "type": kind}}).encode())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Replies:
    """Every answer is built once at start-up; only the streaming one depends on the request."""

    def __init__(self, alias: str, stream_chunks: int) -> None:
        created = int(time.time())
        self.health = _response(200, b'{"status":"ok"}')
        self.models = _response(200, json.dumps({
            "object": "list",
            "data": [{"id": alias, "object": "model", "created": created, "owned_by": "llamacpp"}],
        }).encode())
        usage = {"prompt_tokens": 12, "completion_tokens": stream_chunks, "total_tokens": 12 + stream_chunks}
        self.chat = _response(200, json.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": created, "model": alias,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": CONTENT}}],
            "usage": usage,
        }).encode())
        self.completion = _response(200, json.dumps({
            "id": "cmpl-fake", "object": "text_completion", "created": created, "model": alias,
            "choices": [{"index": 0, "finish_reason": "stop", "text": CONTENT, "logprobs": None}],
            "usage": usage,
        }).encode())
        self.unauthorized = _error(401, "Invalid API Key", "authentication_error")
        self.not_found = _error(404, "File Not Found", "not_found_error")
        self.bad_json = _error(400, "Invalid JSON in request body", "invalid_request_error")
        self.stream_head = (
            b"HTTP/1.1 200 OK\r\nServer: fake-llama-server\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100000\r\n\r\n"
        )

        def event(delta: dict[str, str], finish: str | None, extra: dict[str, object] | None = None) -> bytes:
            payload: dict[str, object] = {
                "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": alias,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if extra:
                payload.update(extra)
            return _chunk(b"data: " + json.dumps(payload).encode() + b"\n\n")

        words = [f"tok{i} " for i in range(stream_chunks)]
        self.stream_events = [event({"role": "assistant", "content": ""}, None)]
        self.stream_events += [event({"content": word}, None) for word in words]
        self.stream_events.append(event({}, "stop"))
        self.stream_usage = _chunk(b"data: " + json.dumps({
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": alias,
            "choices": [], "usage": usage,
        }).encode() + b"\n\n")
        self.stream_done = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


class FakeLlamaProtocol(asyncio.Protocol):
    """One connection: parse requests out of the buffer as they complete, answer them in order."""

    def __init__(self, replies: Replies, keys: frozenset[bytes], token_interval: float = 0.0) -> None:
        self.replies = replies
        self.keys = keys
        self.token_interval = token_interval
        self.buf = b""
        self.busy = False  # a paced stream is in flight: later requests wait in the buffer
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        while self.transport is not None and self.buf and not self.busy:
            if not self._one():
                return

    def _one(self) -> bool:
        """Handle one complete request at the front of the buffer; False when more bytes are needed."""
        assert self.transport is not None
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._fail(431)
            return False
        head = self.buf[:end].split(b"\r\n")
        parts = head[0].split(b" ")
        if len(parts) != 3:
            self._fail(400)
            return False
        method, target, version = parts
        headers: dict[bytes, bytes] = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._fail(411)
            return False
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            self._fail(400)
            return False
        if length > MAX_BODY:
            self._fail(413)
            return False
        start = end + 4
        if len(self.buf) < start + length:
            return False
        body = self.buf[start:start + length]
        self.buf = self.buf[start + length:]
        connection = headers.get(b"connection", b"").lower()
        close = connection == b"close" or (version == b"HTTP/1.0" and connection != b"keep-alive")
        self._answer(method, target.split(b"?", 1)[0], headers, body)
        if close:
            self.transport.close()
            self.transport = None
            return False
        return True

    def _answer(self, method: bytes, path: bytes, headers: dict[bytes, bytes], body: bytes) -> None:
        assert self.transport is not None
        r = self.replies
        if path == b"/health":
            self.transport.write(r.health)
            return
        if path.startswith(b"/v1/"):
            auth = headers.get(b"authorization", b"")
            if not auth.startswith(b"Bearer ") or auth[7:].strip() not in self.keys:
                self.transport.write(r.unauthorized)
                return
        if method == b"GET" and path == b"/v1/models":
            self.transport.write(r.models)
        elif method == b"POST" and path in (b"/v1/chat/completions", b"/chat/completions"):
            self._chat(body)
        elif method == b"POST" and path in (b"/v1/completions", b"/completions"):
            self.transport.write(r.completion)
        else:
            self.transport.write(r.not_found)

    def _chat(self, body: bytes) -> None:
        assert self.transport is not None
        r = self.replies
        if b'"stream"' not in body:  # the fast path: no JSON parsing at all
            self.transport.write(r.chat)
            return
        try:
            request = json.loads(body)
        except ValueError:
            self.transport.write(r.bad_json)
            return
        if not isinstance(request, dict) or request.get("stream") is not True:
            self.transport.write(r.chat)
            return
        options = request.get("stream_options")
        usage = isinstance(options, dict) and options.get("include_usage") is True
        # One write per event, as a real server flushes per token; the gateway sees them as they come.
        events = [r.stream_head, *r.stream_events, *([r.stream_usage] if usage else []), r.stream_done]
        if self.token_interval > 0:
            self._paced(events)
            return
        for event in events:
            self.transport.write(event)

    def _paced(self, events: list[bytes]) -> None:
        self.busy = True
        loop = asyncio.get_running_loop()
        pending = iter(events)

        def step() -> None:
            if self.transport is None:
                return
            event = next(pending, None)
            if event is None:
                self.busy = False
                self.data_received(b"")  # answer whatever arrived meanwhile
                return
            self.transport.write(event)
            loop.call_later(self.token_interval, step)

        step()

    def _fail(self, status: int) -> None:
        assert self.transport is not None
        self.transport.write(_error(status, _REASONS.get(status, "error"), "invalid_request_error"))
        self.transport.close()
        self.transport = None
        self.buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fake llama-server for benchmarks", allow_abbrev=False)
    p.add_argument("--version", action="store_true")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("-m", "--model", default="fake.gguf")
    p.add_argument("-a", "--alias", default=None)
    p.add_argument("--api-key", action="append", default=[])
    p.add_argument("--api-key-file", default=None)
    p.add_argument("--exit-after", type=float, default=0.0, help="stop by itself after this many seconds (0: never)")
    p.add_argument("--stream-chunks", type=int, default=8)
    p.add_argument("--token-interval", type=float, default=0.0)
    args, _unknown = p.parse_known_args(argv)  # -c, -ngl, --parallel, -t, ... mean nothing to a fake
    return args


def load_keys(args: argparse.Namespace) -> frozenset[bytes]:
    keys = {k.encode() for k in args.api_key}
    if os.environ.get("LLAMA_API_KEY"):  # as llama-server reads it (the gateway passes its per-boot key so)
        keys.add(os.environ["LLAMA_API_KEY"].encode())
    if args.api_key_file:
        for line in Path(args.api_key_file).read_text().splitlines():
            if line.strip():
                keys.add(line.strip().encode())
    return frozenset(keys)


async def serve(args: argparse.Namespace) -> None:
    keys = load_keys(args)
    if not keys:
        print("fake-llama-server: no API key given (LLAMA_API_KEY, --api-key-file or --api-key); refusing to start",
              file=sys.stderr)
        raise SystemExit(1)
    replies = Replies(args.alias or Path(args.model).name, args.stream_chunks)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeLlamaProtocol(replies, keys, args.token_interval), args.host,
                                      args.port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if args.exit_after > 0:
        loop.call_later(args.exit_after, stop.set)
    print(f"fake-llama-server listening on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.version:
        print("version: 0 (fake)\nbuilt with python for a benchmark", file=sys.stderr)
        return 0
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
