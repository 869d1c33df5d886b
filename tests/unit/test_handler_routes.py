"""Serverless jobs on every route of lifecycle.routes: parse_job_input, the feature check, raw SSE pass-through."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from handler.jobs import OPENAI_ROUTES, BackendCall, JobInputError, parse_job_input
from handler.worker import JobHandler
from lifecycle.backend import Backend
from lifecycle.routes import JSON_ROUTES
from lifecycle.settings import Settings

LIMIT = 100_000
BODIES: dict[str, dict[str, Any]] = {
    "/v1/responses": {"input": "hi", "max_output_tokens": 8},
    "/v1/responses/input_tokens": {"input": "hi"},
    "/v1/messages": {"model": "any", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/rerank": {"query": "a", "documents": ["b", "c"]},
    "/tokenize": {"content": "hello"},
    "/detokenize": {"tokens": [1, 2]},
    "/infill": {"input_prefix": "def f(", "input_suffix": "):", "n_predict": 4},
}


def test_every_served_route_and_the_model_list_are_job_routes() -> None:
    assert set(OPENAI_ROUTES) == {*JSON_ROUTES, "/v1/models"}


@pytest.mark.parametrize("route", list(JSON_ROUTES))
def test_a_route_takes_openai_input_as_its_body(route: str) -> None:
    body = BODIES.get(route, {"prompt": "x"})
    call = parse_job_input({"openai_route": route, "openai_input": body}, LIMIT)
    assert call == BackendCall("POST", route, body, stream=False, native=False)


@pytest.mark.parametrize("route", list(JSON_ROUTES))
def test_only_a_generating_route_streams(route: str) -> None:
    call = parse_job_input({"openai_route": route, "openai_input": {**BODIES.get(route, {}), "stream": True}}, LIMIT)
    assert call.stream is JSON_ROUTES[route].generates
    assert call.body is not None and call.body["stream"] is True  # the body is sent as it is


def test_responses_and_messages_stream() -> None:
    for route in ("/v1/responses", "/v1/messages"):
        assert parse_job_input({"openai_route": route, "openai_input": {**BODIES[route], "stream": True}},
                               LIMIT).stream


@pytest.mark.parametrize(
    ("job_input", "message"),
    [({"openai_route": "/slots"}, "unknown openai_route '/slots'"),
     ({"openai_route": "/v1/stream"}, "unknown openai_route"),
     ({"openai_route": "/v1/chat/completions/control", "openai_input": {}}, "unknown openai_route"),
     ({"openai_route": "/v1/audio/transcriptions", "openai_input": {}}, "unknown openai_route"),
     ({"openai_route": "/props"}, "unknown openai_route"),
     ({"openai_route": ["/v1/messages"]}, "unknown openai_route"),
     ({"openai_route": "/v1/messages"}, "openai_input must be a JSON object with the request body of /v1/messages"),
     ({"openai_route": "/v1/rerank", "openai_input": [1]}, "openai_input must be a JSON object"),
     ({"openai_route": "/v1/responses", "openai_input": {"stream": "yes"}}, "openai_input.stream")],
)
def test_bad_route_inputs(job_input: dict[str, Any], message: str) -> None:
    with pytest.raises(JobInputError, match=message.replace("[", r"\[")):
        parse_job_input(job_input, LIMIT)


def run_job(tmp_path: Path, env: dict[str, str], job_input: dict[str, Any]) -> list[Any]:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), **env}, probe_roots=[])
    handler = JobHandler(settings, Backend(settings), backend_wait=0.2)

    async def run() -> list[Any]:
        return [item async for item in handler.run({"id": "j", "input": job_input})]

    return asyncio.run(run())


@pytest.mark.parametrize(("route", "setting"), [("/v1/embeddings", "EMBEDDINGS"), ("/v1/rerank", "RERANK"),
                                                ("/rerank", "RERANK"), ("/v1/reranking", "RERANK")])
def test_a_route_whose_feature_is_off_fails_the_job_naming_the_setting(tmp_path: Path, route: str,
                                                                       setting: str) -> None:
    job = {"openai_route": route, "openai_input": BODIES.get(route, {"input": "x", "query": "a", "documents": []})}
    (result,) = run_job(tmp_path, {}, job)
    assert f"set {setting}=true" in result["error"] and route in result["error"]
    # On, the job goes on to the backend (not started here: it waits for it, then fails saying so).
    (result,) = run_job(tmp_path, {setting: "true"}, job)
    assert "did not become ready" in result["error"]


class FakeStream:
    """What JobHandler._events reads of lifecycle.upstream.Stream: the status and the body in pieces."""

    def __init__(self, pieces: list[bytes], status: int = 200) -> None:
        self.status = status
        self.pieces = list(pieces)

    async def read(self) -> bytes:
        return self.pieces.pop(0) if self.pieces else b""

    async def read_all(self) -> bytes:
        return b"".join(self.pieces)


RESPONSES_SSE = (
    b'event: response.created\ndata: {"response":{"id":"resp_1","object":"response","status":"in_progress"},'
    b'"type":"response.created"}\n\n'
    b'event: response.output_text.delta\ndata: {"delta":"Hel","item_id":"msg_1",'
    b'"type":"response.output_text.delta"}\n\n'
    b":\n\n"
    b'event: response.completed\ndata: {"response":{"id":"resp_1","status":"completed","usage":{"input_tokens":3,'
    b'"output_tokens":1,"total_tokens":4}},"type":"response.completed"}\n\n'
)
ANTHROPIC_SSE = (
    b'event: message_start\ndata: {"message":{"id":"chatcmpl-1","role":"assistant","type":"message",'
    b'"usage":{"input_tokens":3,"output_tokens":0}},"type":"message_start"}\n\n'
    b'event: content_block_delta\ndata: {"delta":{"text":"Hi","type":"text_delta"},"index":0,'
    b'"type":"content_block_delta"}\n\n'
    b'event: message_delta\ndata: {"delta":{"stop_reason":"end_turn"},"type":"message_delta",'
    b'"usage":{"output_tokens":1}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


@pytest.mark.parametrize(("route", "sse"), [("/v1/responses", RESPONSES_SSE), ("/v1/messages", ANTHROPIC_SSE)])
@pytest.mark.parametrize("cut", [1, 7, 50, 10_000])
def test_responses_and_messages_streams_pass_through_as_raw_sse(tmp_path: Path, route: str, sse: bytes,
                                                                cut: int) -> None:
    """Their own event formats, no [DONE]: yielded exactly as llama-server sent them, whole events only."""
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    handler = JobHandler(settings, Backend(settings))
    call = parse_job_input({"openai_route": route, "openai_input": {**BODIES[route], "stream": True}}, LIMIT)
    pieces = [sse[i:i + cut] for i in range(0, len(sse), cut)]

    async def run() -> list[Any]:
        return [item async for item in handler._events(call, FakeStream(pieces))]  # type: ignore[arg-type]

    out = asyncio.run(run())
    assert all(isinstance(item, str) and item.endswith("\n\n") for item in out)
    assert "".join(out).encode() == sse
    assert "[DONE]" not in "".join(out)


def test_a_refused_stream_fails_the_job_with_llama_servers_message(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])
    handler = JobHandler(settings, Backend(settings))
    call = parse_job_input({"openai_route": "/v1/messages", "openai_input": {**BODIES["/v1/messages"],
                                                                             "stream": True}}, LIMIT)
    body = b'{"error":{"code":400,"message":"the request exceeds the available context size","type":"x"}}'

    async def run() -> list[Any]:
        return [item async for item in handler._events(call, FakeStream([body], 400))]  # type: ignore[arg-type]

    assert asyncio.run(run()) == [{"error": "the model backend answered 400: the request exceeds the available "
                                            "context size"}]
