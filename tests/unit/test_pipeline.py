"""gateway.pipeline: admit -> upstream -> relay -> record, with a stand-in upstream and wire (no sockets)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.admission import Admissions
from gateway.guard import Guard
from gateway.metrics import Metrics
from gateway.observe import JSON, SSE, Observer
from gateway.pipeline import Exchange, Pipeline
from gateway.stats import Stats
from lifecycle.backend import Backend, Failure
from lifecycle.settings import Settings
from lifecycle.supervisor import BackendState
from lifecycle.upstream import Reply, Stream, UpstreamConnectError, UpstreamTimeout


class FakeStream(Stream):
    """Pieces handed out one read at a time (Stream's own __init__ needs a socket)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.content_type, self.status = "text/event-stream", 200
        self.pieces = list(pieces)
        self.closed = False

    async def read(self) -> bytes:
        await asyncio.sleep(0)
        return self.pieces.pop(0) if self.pieces else b""

    def close(self) -> None:
        self.closed = True

    async def __aenter__(self) -> FakeStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class FakeUpstream:
    def __init__(self, reply: Any = None, stream: FakeStream | None = None, error: Exception | None = None) -> None:
        self.reply, self.stream, self.error = reply, stream, error
        self.sent: list[tuple[str, str, bytes | None]] = []

    async def request(self, method: str, path: str, *, body: bytes | None = None, headers: Any = None,
                    timeout: float | None = None) -> Reply:
        self.sent.append((method, path, body))
        if self.error is not None:
            raise self.error
        return self.reply

    async def open_stream(self, method: str, path: str, *, body: bytes | None = None, headers: Any = None) -> Any:
        self.sent.append((method, path, body))
        if self.error is not None:
            raise self.error
        return self.stream


class FakeBackend:
    """What the pipeline reads of lifecycle.backend.Backend, with Backend's own failure classification."""

    def __init__(self) -> None:
        self.state = BackendState.READY
        self.pid: int | None = None
        self.model_id = "model"
        self.models = None  # one model
        self.router = None

    @property
    def ready(self) -> bool:
        return self.state is BackendState.READY

    async def gone(self, pid: int | None, within: float = 2.0) -> bool:
        return True

    async def classify(self, exc: Exception, pid: int | None) -> Failure:
        return await Backend.classify(self, exc, pid)  # type: ignore[arg-type]


class FakeWire:
    def __init__(self, leave_after: int | None = None) -> None:
        self.sent: list[tuple[int, str, bytes, Mapping[str, str] | None]] = []
        self.opened: int | None = None
        self.chunks: list[bytes] = []
        self.closed = False
        self.leave_after = leave_after

    def send(self, status: int, content_type: str, body: bytes, headers: Mapping[str, str] | None) -> None:
        self.sent.append((status, content_type, body, headers))

    async def open(self, status: int) -> None:
        self.opened = status

    async def write(self, chunk: bytes) -> None:
        if self.leave_after is not None and len(self.chunks) >= self.leave_after:
            raise ConnectionResetError("gone")
        self.chunks.append(chunk)

    async def close(self) -> None:
        self.closed = True


def make(tmp_path: Path, upstream: Any, capacity: int = 2, **env: str) -> tuple[Pipeline, Observer]:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "QUEUE_TIMEOUT": "0.05", **env}, probe_roots=[])
    backend = FakeBackend()
    metrics = Metrics(CollectorRegistry())
    observer = Observer(metrics, None, lambda: "model")
    pipeline = Pipeline(settings, backend, upstream, Admissions(capacity, 0, 0.05), metrics,  # type: ignore[arg-type]
                        Stats(), observer, Guard(settings))
    return pipeline, observer


def exchange(body: bytes | None = b"{}", stream: bool = False, slots: int = 1) -> Exchange:
    return Exchange(time.monotonic(), "POST" if body is not None else "GET", "/v1/chat/completions", "rid",
                    "key", None, body, stream, slots)


def test_a_whole_answer_is_sent_and_its_usage_kept_for_the_batch(tmp_path: Path) -> None:
    reply = Reply(200, "application/json", b'{"usage": {"prompt_tokens": 3, "completion_tokens": 2}}')
    pipeline, _ = make(tmp_path, FakeUpstream(reply))
    ex, wire = exchange(), FakeWire()
    asyncio.run(pipeline.run(ex, wire))
    assert wire.sent == [(200, "application/json", reply.body, None)]
    assert ex.status == 200 and ex.answer is not None and ex.answer.kind == JSON
    assert pipeline.admission.active == 0


def test_a_stream_is_relayed_and_its_tail_and_ttft_kept(tmp_path: Path) -> None:
    stream = FakeStream([b"data: {}\n\n", b'data: {"usage": {}}\n\n', b"data: [DONE]\n\n"])
    pipeline, _ = make(tmp_path, FakeUpstream(stream=stream))
    ex, wire = exchange(stream=True), FakeWire()
    asyncio.run(pipeline.run(ex, wire))
    assert wire.opened == 200 and wire.closed and b"".join(wire.chunks).endswith(b"[DONE]\n\n")
    assert ex.ttft is not None and ex.answer is not None and ex.answer.kind == SSE and stream.closed


def test_a_client_that_leaves_mid_stream_closes_the_upstream_request(tmp_path: Path) -> None:
    stream = FakeStream([b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n"])
    pipeline, _ = make(tmp_path, FakeUpstream(stream=stream))
    wire = FakeWire(leave_after=1)
    asyncio.run(pipeline.run(exchange(stream=True), wire))
    assert stream.closed and not wire.closed and len(wire.chunks) == 1
    assert pipeline.admission.active == 0


def test_a_request_that_gets_no_slot_in_time_is_a_503_queue_timeout(tmp_path: Path) -> None:
    pipeline, _ = make(tmp_path, FakeUpstream(Reply(200, "application/json", b"{}")), capacity=1)

    async def scenario() -> None:
        await pipeline.admission.of(None).acquire(1)  # the only slot is held
        ex, wire = exchange(), FakeWire()
        await pipeline.run(ex, wire)
        (status, _, body, headers), = wire.sent
        assert status == 503 and json.loads(body)["error"]["code"] == "queue_timeout"
        assert ex.rejected == "queue_timeout" and headers and "Retry-After" in headers
        assert pipeline.stats.queue_rejections == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(("error", "status", "code"), [
    (UpstreamConnectError("refused"), 503, "backend_unavailable"),
    (UpstreamTimeout("slow"), 504, "backend_timeout"),
])
def test_backend_failures_are_classified_once(tmp_path: Path, error: Exception, status: int, code: str) -> None:
    pipeline, _ = make(tmp_path, FakeUpstream(error=error))
    wire = FakeWire()
    asyncio.run(pipeline.run(exchange(), wire))
    assert wire.sent[0][0] == status and json.loads(wire.sent[0][2])["error"]["code"] == code


def test_nothing_goes_upstream_while_the_backend_is_not_ready(tmp_path: Path) -> None:
    upstream = FakeUpstream(Reply(200, "application/json", b"{}"))
    pipeline, _ = make(tmp_path, upstream)
    pipeline.backend.state = BackendState.LOADING
    wire = FakeWire()
    asyncio.run(pipeline.run(exchange(), wire))
    assert wire.sent[0][0] == 503 and not upstream.sent


def test_record_counts_and_observes_every_request(tmp_path: Path) -> None:
    pipeline, observer = make(tmp_path, FakeUpstream())

    async def scenario() -> None:
        ex = exchange()
        pipeline.begin(ex)
        assert pipeline.stats.requests_active == 1
        pipeline.record(ex, 499)
        observer.flush()

    asyncio.run(scenario())
    assert pipeline.stats.requests_active == 0 and pipeline.stats.requests_error == 1
