from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from handler import worker
from handler.jobs import JobInputError, encode_body, parse_job_input
from handler.worker import JobHandler, _event_json, collect, native_result
from lifecycle.backend import Backend
from lifecycle.request_rules import Limits
from lifecycle.settings import Settings

LIMIT = 10_000


def test_native_chat() -> None:
    call = parse_job_input({"messages": [{"role": "user", "content": "hi"}],
                            "sampling_params": {"max_tokens": 5, "temperature": 0.5, "stop": ["\n"]}}, LIMIT)
    assert (call.method, call.path, call.stream, call.native) == ("POST", "/v1/chat/completions", False, True)
    assert call.body == {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0.5,
                         "stop": ["\n"], "stream": False}


def test_native_prompt_streaming_asks_for_usage() -> None:
    call = parse_job_input({"prompt": "Once", "stream": True}, LIMIT)
    assert call.path == "/v1/completions" and call.stream
    assert call.body is not None and call.body["stream_options"] == {"include_usage": True}


def test_openai_routes() -> None:
    call = parse_job_input({"openai_route": "/v1/embeddings", "openai_input": {"input": "x"}}, LIMIT)
    assert (call.method, call.path, call.native, call.body) == ("POST", "/v1/embeddings", False, {"input": "x"})
    assert parse_job_input({"openai_route": "/v1/models"}, LIMIT).method == "GET"
    assert parse_job_input({"openai_route": "/v1/completions", "openai_input": {"prompt": "x", "stream": True}},
                           LIMIT).stream


@pytest.mark.parametrize(
    ("job_input", "message"),
    [
        (None, "must be a JSON object"),
        ([], "must be a JSON object"),
        ({}, "needs messages"),
        ({"messages": [], "prompt": "x"}, "either messages or prompt"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"content": "x"}]}, "messages[0]"),
        ({"prompt": ""}, "non-empty string"),
        ({"prompt": "x", "stream": "yes"}, "stream must be true or false"),
        ({"prompt": "x", "sampling_params": []}, "sampling_params must be"),
        ({"prompt": "x", "sampling_params": {"temperature": True}}, "temperature must be"),
        ({"prompt": "x", "sampling_params": {"foo": 1}}, "unknown sampling_params foo"),
        ({"prompt": "x", "extra": 1}, "unknown input keys extra"),
        ({"openai_route": "/slots"}, "unknown openai_route"),
        ({"openai_route": "/v1/chat/completions"}, "openai_input must be"),
        ({"openai_route": "/v1/chat/completions", "openai_input": {"stream": 1}}, "openai_input.stream"),
        ({"prompt": "x" * LIMIT}, "over the limit"),
    ],
)
def test_bad_inputs(job_input: object, message: str) -> None:
    with pytest.raises(JobInputError) as err:
        parse_job_input(job_input, LIMIT)
    assert message in str(err.value)


def test_native_result_and_events() -> None:
    response = {"choices": [{"message": {"content": "Hi"}, "finish_reason": "stop"}], "usage": {"total_tokens": 3}}
    assert native_result(response) == {"text": "Hi", "finish_reason": "stop", "usage": {"total_tokens": 3}}
    assert _event_json(b'data: {"a": 1}') == {"a": 1}
    assert _event_json(b"data: [DONE]") is None


def test_job_waits_for_backend_then_fails_clearly(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    handler = JobHandler(settings, Backend(settings), backend_wait=0.3)

    async def run() -> list[object]:
        return [item async for item in handler.run({"id": "j", "input": {"prompt": "hi"}})]

    (result,) = asyncio.run(run())
    assert isinstance(result, dict)
    assert "did not become ready within 0.3s" in result["error"]


# --- JOB_MAX_TOKENS and MAX_TOKENS ---------------------------------------------------------------------------


def test_a_native_job_without_max_tokens_gets_job_max_tokens() -> None:
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for job in (chat, {"prompt": "Once upon a time", "stream": True}):
        assert parse_job_input(job, LIMIT, 512).body["max_tokens"] == 512  # type: ignore[index]
    # What the job asks for is kept, -1 (up to MAX_TOKENS) too.
    for asked in (8, 2048, -1):
        call = parse_job_input({**chat, "sampling_params": {"max_tokens": asked}}, LIMIT, 512)
        assert call.body["max_tokens"] == asked  # type: ignore[index]
    # openai_route bodies are sent as they are: OpenAI's semantics, up to MAX_TOKENS (llama-server's -n).
    for route in ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"):
        call = parse_job_input({"openai_route": route, "openai_input": {"prompt": "x"}}, LIMIT, 512)
        assert call.body == {"prompt": "x"}, route


def test_job_max_tokens_setting_and_its_ceiling(tmp_path: Path) -> None:
    def handler(**env: str) -> JobHandler:
        settings = Settings.from_env({"DATA_DIR": str(tmp_path), **env}, probe_roots=[])
        return JobHandler(settings, Backend(settings))

    assert handler().job_max_tokens == 512
    assert handler(JOB_MAX_TOKENS="100").job_max_tokens == 100
    assert handler(JOB_MAX_TOKENS="1000", MAX_TOKENS="256").job_max_tokens == 256  # never one MAX_TOKENS refuses


def test_a_job_over_max_tokens_fails_naming_the_field_and_the_setting(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "MAX_TOKENS": "4096"}, probe_roots=[])
    call = parse_job_input({"prompt": "x", "sampling_params": {"max_tokens": 5000}}, LIMIT, 512)
    with pytest.raises(JobInputError) as err:
        encode_body(call, Limits.from_settings(settings))
    message = str(err.value)
    assert message.startswith("sampling_params.max_tokens=5000 is not allowed")
    assert "1 to 4096 (MAX_TOKENS)" in message and "JOB_MAX_TOKENS" in message
    # Through the handler: one error, before any backend is asked (none runs here).
    handler = JobHandler(settings, Backend(settings), backend_wait=0.1)

    async def run() -> list[object]:
        return [item async for item in handler.run({"id": "j", "input": {"messages": [{"role": "user",
                "content": "hi"}], "sampling_params": {"max_tokens": 4097}}})]

    (result,) = asyncio.run(run())
    assert isinstance(result, dict) and "sampling_params.max_tokens=4097" in result["error"]
    assert "MAX_TOKENS" in result["error"]


# --- failures: one {"error"} item, always the last --------------------------------------------------------------


class _StubStream:
    """A streamed backend answer (lifecycle.upstream.Stream) that records when it is closed."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.status = 200
        self.pieces = list(pieces)
        self.closed = False
        self.close_calls = 0

    def close(self) -> None:
        self.close_calls += 1
        self.closed = True

    async def __aenter__(self) -> _StubStream:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.closed = True

    async def read(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""


class _StubBackend:
    ready = True
    pid = 1

    def __init__(self, stream: _StubStream) -> None:
        self.stream = stream
        self.sent: list[dict[str, Any]] = []

    def client(self, **_kwargs: object) -> _StubBackend:
        return self

    async def open_stream(self, _method: str, _path: str, body: bytes, headers: object) -> _StubStream:
        self.sent.append(json.loads(body))
        return self.stream


def test_an_error_mid_stream_is_the_last_item_after_the_backend_stream_is_closed(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    stream = _StubStream([b'data: {"choices":[{"text":"Once"}]}\n\n',
                          b'data: {"error":{"code":500,"message":"boom"}}\n\n',
                          b'data: {"choices":[{"text":" more"}]}\n\n'])
    backend = _StubBackend(stream)
    handler = JobHandler(settings, backend)  # type: ignore[arg-type]

    async def run() -> list[tuple[object, bool]]:
        return [(item, stream.closed) async for item in handler.run({"id": "j", "input": {"prompt": "Once",
                                                                                          "stream": True}})]

    assert asyncio.run(run()) == [("Once", False), ({"error": "the model backend answered 500: boom"}, True)]
    assert backend.sent[0]["max_tokens"] == 512  # JOB_MAX_TOKENS went to llama-server


def test_a_bug_in_the_handler_is_one_clear_error_not_an_exception(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Raised, the SDK's queue loop would fail the job with a traceback, and its local API server answer a 500."""
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    handler = JobHandler(settings, Backend(settings))

    def broken(*_args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(worker, "parse_job_input", broken)

    async def run() -> list[object]:
        return [item async for item in handler.run({"id": "j", "input": {"prompt": "hi"}})]

    assert asyncio.run(run()) == [{"error": "the worker failed on this job (RuntimeError: boom)"}]


def test_local_test_mode_gets_the_error_as_the_result() -> None:
    """collect: what the SDK's local test mode awaits; its run_job makes {"error"} the result's error (exit 1)."""

    async def job(_job: dict[str, Any]) -> AsyncIterator[Any]:
        yield "Once"
        yield {"error": "the model backend broke off its answer"}

    assert asyncio.run(collect(job)({"id": "j"})) == {"error": "the model backend broke off its answer"}


# --- a stopped job closes its backend stream ---------------------------------------------------------------------


class _EndlessStream(_StubStream):
    """A backend that keeps generating: a piece every 10 ms until the connection is closed."""

    def __init__(self) -> None:
        super().__init__([])

    async def read(self) -> bytes:
        await asyncio.sleep(0.01)
        return b'data: {"choices":[{"text":"tok"}]}\n\n'


def _endless_job(tmp_path: Path) -> tuple[JobHandler, _EndlessStream]:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    stream = _EndlessStream()
    return JobHandler(settings, _StubBackend(stream)), stream  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["reading the backend", "posting a chunk"])
def test_a_cancelled_job_task_closes_the_backend_stream_at_once(tmp_path: Path, where: str) -> None:
    """The SDK stops a job by cancelling its task (rp_scale.JobScaler.stop_job), wherever that task is: in the
    handler waiting on llama-server, or in its own stream_result post with the handler suspended at a yield (which
    nothing resumes until the generator is garbage-collected)."""
    handler, stream = _endless_job(tmp_path)
    chunks: list[object] = []

    async def sdk_job(generator: AsyncIterator[Any], posting: asyncio.Event) -> None:
        async for item in generator:
            chunks.append(item)
            if where == "posting a chunk" and len(chunks) == 3:
                posting.set()
                await asyncio.sleep(3600)  # the job-stream post, when the stop arrives

    async def main() -> tuple[bool, bool]:
        generator = handler.run({"id": "j", "input": {"prompt": "Once", "stream": True}})  # kept: no GC close
        posting = asyncio.Event()
        task = asyncio.create_task(sdk_job(generator, posting))
        if where == "posting a chunk":
            await posting.wait()
        else:
            while len(chunks) < 3:
                await asyncio.sleep(0.005)
        assert not stream.closed
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # done callbacks run on the next loop pass
        closed_at_once = stream.closed
        await generator.aclose()  # type: ignore[attr-defined]
        return closed_at_once, stream.closed

    assert asyncio.run(main()) == (True, True)


def test_a_finished_job_leaves_no_callback_on_its_task(tmp_path: Path) -> None:
    """Once the stream is over (closed by `async with`), the task's end does not touch it again."""
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    stream = _StubStream([b'data: {"choices":[{"text":"Once"}]}\n\n'])
    handler = JobHandler(settings, _StubBackend(stream))  # type: ignore[arg-type]

    async def job() -> list[object]:
        return [item async for item in handler.run({"id": "j", "input": {"prompt": "Once", "stream": True}})]

    async def main() -> list[object]:
        items = await asyncio.create_task(job())
        await asyncio.sleep(0)
        return items

    assert asyncio.run(main()) == ["Once"]
    assert stream.closed and stream.close_calls == 0
