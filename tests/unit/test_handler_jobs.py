from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from handler.jobs import JobInputError, parse_job_input
from handler.worker import JobHandler, _event_json, native_result
from lifecycle.backend import Backend
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
