"""The official openai client against HTTP mode, the real llama-server and SmolLM2."""

from __future__ import annotations

import time

import openai
import pytest
import requests

from tests.conftest import Gateway


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "Say hello in one short sentence."}]


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="any", messages=CHAT, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip()
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_chat_streaming_arrives_in_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="any", messages=CHAT, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) > 3
    assert "".join(pieces).strip()
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens >= len(pieces)


def test_stream_is_not_buffered(gateway: Gateway) -> None:
    """The first event reaches the client long before the generation ends."""
    body = {"model": "any", "prompt": "Count: 1, 2, 3,", "max_tokens": 200, "stream": True, "temperature": 0,
            "ignore_eos": True}
    start = time.monotonic()
    with requests.post(f"{gateway.url}/v1/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = resp.iter_lines()
        first = next(line for line in lines if line)
        first_at = time.monotonic() - start
        rest = [line for line in lines if line]
        total = time.monotonic() - start
    assert first.startswith(b"data: ")
    assert rest[-1] == b"data: [DONE]"
    assert first_at < total / 2


def test_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model="any", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_models_lists_the_one_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]


def test_any_model_name_reaches_the_model(client: openai.OpenAI) -> None:
    for name in ("any", "gpt-4o", "SmolLM2-135M-Instruct.Q4_1.gguf"):
        reply = client.chat.completions.create(model=name, messages=CHAT, max_tokens=4)
        assert reply.choices[0].message.content is not None


def test_stale_keep_alive_connection_never_fails_a_request(client: openai.OpenAI) -> None:
    """llama-server closes keep-alive connections idle for 5 s; the next request must still succeed."""
    client.chat.completions.create(model="any", messages=CHAT, max_tokens=2)
    time.sleep(6)
    reply = client.chat.completions.create(model="any", messages=CHAT, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_embeddings(make_gateway) -> None:  # type: ignore[no-untyped-def]
    gw = make_gateway({"EMBEDDINGS": "true", "EXTRA_ARGS": "--pooling mean"}, name="emb")
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="any", input=["hello world", "goodbye"])
    assert len(result.data) == 2
    assert len(result.data[0].embedding) == 576  # SmolLM2-135M's hidden size
    assert result.data[0].embedding != result.data[1].embedding
