#!/usr/bin/env python3
"""A stand-in llama-server for supervisor fault tests (slow start, crash while loading, ignores SIGTERM).

FAKE_MODE: ready (default) | never_ready | exit_loading | ignore_sigterm | crash_after_ready (exits with code 9
FAKE_CRASH_AFTER seconds after start) | stall_stream (POSTs answer one SSE event, then stall FAKE_STALL seconds) |
chat (POSTs answer like llama-server's chat completions: `max_tokens` tokens, whole or streamed one event per token
every FAKE_TOKEN_INTERVAL seconds, with usage (include_usage) and timings; prompt and cached token counts vary from
one request to the next).
FAKE_START_DELAY: seconds to wait (alive, not listening) before binding its port.
FAKE_BOOTS_FILE: a file it adds a line to at each start; boot N then prints llama-server's start-up lines with
"offloaded N/31 layers to GPU", and with FAKE_CRASH_BOOTS=K crash_after_ready only crashes on boots 1..K.
GET /props reports the `-c` it was given as n_ctx (none when it got no -c), and --parallel as total_slots.
Takes llama-server's arguments. Like llama-server, it reads its API key from LLAMA_API_KEY: with one, every route
but /health answers 401 without it; GET /v1/models answers 200 to the key. It prints the names (never the values)
of the LLAMA_* and AIP_* variables in its environment.
"""

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

mode = os.environ.get("FAKE_MODE", "ready")
args = sys.argv[1:]
if "--version" in args:
    print("version: 0 (fake)", file=sys.stderr)
    sys.exit(0)
port = int(args[args.index("--port") + 1])
api_key = os.environ.get("LLAMA_API_KEY", "")
print(f"fake llama-server pid {os.getpid()} mode {mode} args {' '.join(args)}", flush=True)
print("env names: " + " ".join(sorted(n for n in os.environ if n.startswith(("LLAMA_", "AIP_")))), flush=True)

if mode == "exit_loading":
    print("loading model ...", flush=True)
    print("error: failed to load model: not a GGUF file", flush=True)
    sys.exit(3)
boot = 0
if os.environ.get("FAKE_BOOTS_FILE"):
    with open(os.environ["FAKE_BOOTS_FILE"], "a+") as boots:
        boots.write("boot\n")
        boots.seek(0)
        boot = len(boots.readlines())
    print("0.00.004.513 I cmn  common_param:   - CPU     : Fake CPU (1000 MiB, 900 MiB free)", flush=True)
    print("0.00.178.563 I common_fit_params: successfully fit params to free device memory", flush=True)
    print(f"0.00.259.530 I load_tensors: offloaded {boot}/31 layers to GPU", flush=True)
    print("0.00.315.886 I load_tensors:        CUDA0 model buffer size =    92.10 MiB", flush=True)
    print("0.00.528.764 I srv  llama_server: model loaded", flush=True)
crash_boots = int(os.environ.get("FAKE_CRASH_BOOTS", "0")) or None
if mode == "crash_after_ready" and (crash_boots is None or boot <= crash_boots):
    import threading

    threading.Timer(float(os.environ.get("FAKE_CRASH_AFTER", "0.5")), lambda: os._exit(9)).start()
if mode == "ignore_sigterm":
    signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))


def _arg(flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args[:-1] else None


answered = 0  # chat mode: requests answered
props = json.dumps({"default_generation_settings": {"n_ctx": int(_arg("-c"))} if _arg("-c") else {},
                    "total_slots": int(_arg("--parallel") or 1)}).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _authorized(self) -> bool:
        if not api_key or self.path in ("/health", "/v1/health"):
            return True
        if self.headers.get("Authorization", "").removeprefix("Bearer ").strip() == api_key:
            return True
        self._json(401, b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}')
        return False

    def _json(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if not self._authorized():
            return
        if mode == "chat":
            self._chat(json.loads(body))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        chunk(b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
        time.sleep(float(os.environ.get("FAKE_STALL", "5")))
        chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def _chat(self, request: dict) -> None:
        global answered
        answered += 1
        completion = int(request.get("max_tokens") or 8)
        prompt, cached = 10 + answered % 7, answered % 5
        usage = {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        timings = {"cache_n": cached, "prompt_n": prompt - cached, "predicted_n": completion, "predicted_ms": 5.0}
        base = {"created": 1, "id": f"chatcmpl-{answered}", "model": "fake", "system_fingerprint": "fake"}
        if not request.get("stream"):
            self._json(200, json.dumps({**base, "object": "chat.completion", "usage": usage, "timings": timings,
                                        "choices": [{"finish_reason": "length", "index": 0, "message": {
                                            "content": "tok " * completion, "role": "assistant"}}]}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def event(data: dict) -> None:
            line = b"data: " + json.dumps({**base, "object": "chat.completion.chunk", **data}).encode() + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()

        def delta(content: dict, finish: str | None = None) -> dict:
            return {"choices": [{"delta": content, "finish_reason": finish, "index": 0}]}

        interval = float(os.environ.get("FAKE_TOKEN_INTERVAL", "0"))
        event(delta({"content": None, "role": "assistant"}))
        for _ in range(completion):
            time.sleep(interval)
            event(delta({"content": "tok "}))
        event({**delta({}, "length"), **({} if request.get("stream_options") else {"timings": timings})})
        if (request.get("stream_options") or {}).get("include_usage"):
            event({"choices": [], "usage": usage, "timings": timings})
        line = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(line), line))
        self.wfile.flush()

    def do_GET(self) -> None:
        if not self._authorized():
            return
        ready_answers = {"/v1/models": b'{"object":"list","data":[{"id":"fake","object":"model"}]}',
                         "/props": props, "/slots": b"[]"}
        if mode != "never_ready" and self.path in ready_answers:
            self._json(200, ready_answers[self.path])
            return
        if mode != "never_ready" and self.path == "/health":
            self._json(200, b'{"status":"ok"}')
            return
        self._json(503, b'{"error":{"message":"Loading model","code":503}}')

    def log_message(self, *_: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        # A client that drops its connection (readiness polls, the gateway's pool) is not news: a traceback here
        # would push the fake's own lines out of the log tail the tests read.
        print(f"connection from {client_address} failed: {sys.exc_info()[1]!r}", flush=True)


time.sleep(float(os.environ.get("FAKE_START_DELAY", "0")))
server = Server(("127.0.0.1", port), Handler)
try:
    server.serve_forever()
finally:
    time.sleep(0)
