"""The API surface real clients use (lifecycle/routes.py), end to end against the real llama-server and SmolLM2,
in both lanes: the official anthropic and openai clients, x-api-key, Anthropic's error shape, token counting,
tokenize/detokenize/apply-template, infill, the routes and fields that are never public, and the token usage of
every API shape in /metrics. docs/API.md describes what is tested here."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests
from requests.structures import CaseInsensitiveDict

from lifecycle.request_rules import REFUSED_FIELDS
from tests.conftest import Gateway

KEY = "sk-api-surface-0123456789"
MAX_TOKENS = 64
CHAT = [{"role": "user", "content": "Hi"}]
# The fast lane takes plain requests; a query string sends the same request down aiohttp's lane.
LANES = {"fast": "", "aiohttp": "?lane=aiohttp"}
QUERY = {"fast": None, "aiohttp": {"lane": "aiohttp"}}  # the same, for the SDKs' default_query


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("api-surface")
    keys = data / "api_keys.txt"
    keys.write_text(f"app:{KEY} routes=inference,embeddings,tokenize\n")  # tokenize: its own route group
    keys.chmod(0o600)
    gateway = Gateway(data, {"AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys), "MAX_TOKENS": str(MAX_TOKENS),
                             "CTX": "1024", "PARALLEL": "2", "MAX_REQUESTS_PER_MINUTE": "100000",
                             "AUTH_FAILURE_LIMIT": "1000", "QUEUE_TIMEOUT": "120"}).start()
    yield gateway
    gateway.stop()


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Answer:
    """One HTTP answer read off a raw socket (what the tests read of requests.Response)."""

    def __init__(self, status: int, headers: CaseInsensitiveDict[str], body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body
        self.text = body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


def post(gw: Gateway, path: str, body: object, lane: str = "fast", headers: dict[str, str] | None = None) -> Answer:
    """POST `body` as JSON, sent in one write on a fresh connection: without a query string the request is the fast
    lane's to take (it also takes one whose body follows its head within PIECES_WAIT, as httpx and requests send
    them, but one write leaves no doubt)."""
    data = json.dumps(body).encode()
    lines = [f"POST {path}{LANES[lane]} HTTP/1.1", f"Host: 127.0.0.1:{gw.port}", "Content-Type: application/json",
             f"Content-Length: {len(data)}"]
    lines += [f"{name}: {value}" for name, value in (bearer() if headers is None else headers).items()]
    with socket.create_connection(("127.0.0.1", gw.port), timeout=120) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        reply = http.client.HTTPResponse(sock, method="POST")
        reply.begin()
        content = reply.read()
        return Answer(reply.status, CaseInsensitiveDict(reply.getheaders()), content)


def scrape(gw: Gateway) -> dict[str, Any]:
    """The JSON /metrics (no key needed: METRICS_AUTH_ENABLED is off by default)."""
    answer = requests.get(f"{gw.url}/metrics", timeout=10)
    assert answer.status_code == 200
    return answer.json()


def claude(gw: Gateway, lane: str = "fast", key: str = KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=120,
                               default_query=QUERY[lane])


def oai(gw: Gateway, lane: str = "fast") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=KEY, max_retries=0, timeout=120,
                         default_query=QUERY[lane])


def is_anthropic_error(body: object, kind: str) -> None:
    assert isinstance(body, dict), body
    assert body["type"] == "error", body
    assert body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert "code" not in body["error"]


def is_gateway_error(answer: requests.Response) -> dict[str, Any]:
    """The gateway's own error JSON (llama-server's has an integer code and types like not_found_error)."""
    assert answer.headers["Content-Type"].startswith("application/json"), answer.headers
    error = answer.json()["error"]
    assert isinstance(error["code"], str), error
    assert error["type"] in ("invalid_request_error", "authentication_error", "server_error"), error
    return error


# ------------------------------------------------------------------------------------------- the lanes themselves


@pytest.mark.parametrize("lane", list(LANES))
def test_the_lane_query_string_picks_the_lane(gw: Gateway, lane: str) -> None:
    """What the parametrised tests rely on: a plain request takes the fast lane, one with a query string does not."""
    before = scrape(gw)["requests_fast_lane"]
    answer = post(gw, "/v1/messages", {"model": "any", "messages": CHAT, "max_tokens": 2}, lane)
    assert answer.status_code == 200, answer.text
    assert scrape(gw)["requests_fast_lane"] - before == (1 if lane == "fast" else 0)


# ------------------------------------------------------------------------------------------- the anthropic client


@pytest.mark.parametrize("lane", list(LANES))
def test_anthropic_messages_create(gw: Gateway, lane: str) -> None:
    message = claude(gw, lane).messages.create(model="any", max_tokens=4, messages=CHAT)
    assert message.type == "message" and message.role == "assistant"
    assert message.content and message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 0
    assert 0 < message.usage.output_tokens <= 4
    assert message.stop_reason in ("max_tokens", "end_turn")


@pytest.mark.parametrize("lane", list(LANES))
def test_anthropic_messages_stream(gw: Gateway, lane: str) -> None:
    with claude(gw, lane).messages.stream(model="any", max_tokens=4, messages=CHAT) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip()
    assert final.content[0].text == text
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) > 0
    assert 0 < final.usage.output_tokens <= 4


@pytest.mark.parametrize("lane", list(LANES))
def test_anthropic_count_tokens(gw: Gateway, lane: str) -> None:
    counted = claude(gw, lane).messages.count_tokens(model="any", messages=CHAT)
    assert counted.input_tokens > 0
    # the same count as the chat route's own counter, for the same conversation
    same = post(gw, "/v1/chat/completions/input_tokens", {"model": "any", "messages": CHAT}, lane)
    assert same.status_code == 200, same.text
    assert same.json()["input_tokens"] == counted.input_tokens


@pytest.mark.parametrize("lane", list(LANES))
def test_anthropic_bad_or_missing_key_is_an_authentication_error_in_anthropic_shape(gw: Gateway, lane: str) -> None:
    with pytest.raises(anthropic.AuthenticationError) as raised:
        claude(gw, lane, key="sk-wrong-0123456789").messages.create(model="any", max_tokens=2, messages=CHAT)
    is_anthropic_error(raised.value.body, "authentication_error")
    assert raised.value.status_code == 401
    # no key at all (the SDK always sends one, so a raw request)
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        answer = post(gw, path, {"model": "any", "max_tokens": 2, "messages": CHAT}, lane, headers={})
        assert answer.status_code == 401
        is_anthropic_error(answer.json(), "authentication_error")
        assert "missing API key" in answer.json()["error"]["message"]


@pytest.mark.parametrize("lane", list(LANES))
def test_anthropic_max_tokens_over_the_cap_is_a_bad_request_in_anthropic_shape(gw: Gateway, lane: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        claude(gw, lane).messages.create(model="any", max_tokens=MAX_TOKENS + 1, messages=CHAT)
    is_anthropic_error(raised.value.body, "invalid_request_error")
    assert "max_tokens" in raised.value.body["error"]["message"]
    assert "MAX_TOKENS" in raised.value.body["error"]["message"]


@pytest.mark.parametrize("lane", list(LANES))
def test_anthropic_request_without_max_tokens_is_capped_by_max_tokens(gw: Gateway, lane: str) -> None:
    answer = post(gw, "/v1/messages", {"model": "any", "messages": [
        {"role": "user", "content": "Write a long story about a dragon."}]}, lane)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    assert 0 < usage["output_tokens"] <= MAX_TOKENS


@pytest.mark.parametrize("lane", list(LANES))
def test_anthropic_stop_sequences_are_capped(gw: Gateway, lane: str) -> None:
    answer = post(gw, "/v1/messages", {"model": "any", "max_tokens": 2, "messages": CHAT,
                                       "stop_sequences": [f"s{i}" for i in range(17)]}, lane)
    assert answer.status_code == 400
    is_anthropic_error(answer.json(), "invalid_request_error")
    assert "stop_sequences" in answer.json()["error"]["message"]


# ------------------------------------------------------------------------------------------- x-api-key


@pytest.mark.parametrize("lane", list(LANES))
def test_x_api_key_works_on_openai_routes(gw: Gateway, lane: str) -> None:
    before = scrape(gw)["requests_fast_lane"]
    answer = post(gw, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}, lane, headers={"x-api-key": KEY})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0
    # the fast lane takes it itself: x-api-key is its key too
    assert scrape(gw)["requests_fast_lane"] - before == (1 if lane == "fast" else 0)
    wrong = post(gw, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}, lane,
                 headers={"x-api-key": "sk-wrong-0123456789"})
    assert wrong.status_code == 401 and is_gateway_error(wrong)["code"] == "invalid_api_key"


@pytest.mark.parametrize("lane", list(LANES))
def test_authorization_wins_over_x_api_key(gw: Gateway, lane: str) -> None:
    both = {"Authorization": "Bearer sk-wrong-0123456789", "x-api-key": KEY}
    answer = post(gw, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}, lane, headers=both)
    assert answer.status_code == 401 and is_gateway_error(answer)["code"] == "invalid_api_key"
    messages = post(gw, "/v1/messages", {"model": "any", "messages": CHAT, "max_tokens": 2}, lane, headers=both)
    assert messages.status_code == 401
    is_anthropic_error(messages.json(), "authentication_error")
    # and the other way round: a good Authorization with a bad x-api-key is served
    good = post(gw, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2}, lane,
                headers={**bearer(), "x-api-key": "sk-wrong-0123456789"})
    assert good.status_code == 200, good.text


# ------------------------------------------------------------------------------------------- the openai client


@pytest.mark.parametrize("lane", list(LANES))
def test_openai_responses_create(gw: Gateway, lane: str) -> None:
    response = oai(gw, lane).responses.create(model="any", input="Say hi.", max_output_tokens=4)
    assert response.object == "response" and response.status == "completed"
    assert response.output_text.strip()
    assert response.usage is not None
    assert response.usage.input_tokens > 0 and 0 < response.usage.output_tokens <= 4
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


@pytest.mark.parametrize("lane", list(LANES))
def test_openai_responses_stream(gw: Gateway, lane: str) -> None:
    events = list(oai(gw, lane).responses.create(model="any", input="Say hi.", max_output_tokens=4, stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created"
    assert "response.output_text.delta" in types
    assert types[-1] == "response.completed"
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text.strip()
    completed = events[-1].response
    assert completed.usage is not None and 0 < completed.usage.output_tokens <= 4


@pytest.mark.parametrize("lane", list(LANES))
def test_openai_responses_input_tokens(gw: Gateway, lane: str) -> None:
    client = oai(gw, lane)
    counted = client.responses.input_tokens.count(model="any", input="Say hi.")
    assert counted.input_tokens > 0
    raw = post(gw, "/v1/responses/input_tokens", {"model": "any", "input": "Say hi."}, lane)
    assert raw.status_code == 200, raw.text
    assert raw.json() == {"input_tokens": counted.input_tokens, "object": "response.input_tokens"}


@pytest.mark.parametrize("lane", list(LANES))
def test_openai_models_retrieve(gw: Gateway, lane: str) -> None:
    client = oai(gw, lane)
    listed = [model.id for model in client.models.list()]
    assert len(listed) == 1
    assert client.models.retrieve("any").id == listed[0]
    assert client.models.retrieve(listed[0]).id == listed[0]


# ------------------------------------------------------------------------------------------- llama.cpp's own routes


@pytest.mark.parametrize("lane", list(LANES))
def test_tokenize_detokenize_round_trip(gw: Gateway, lane: str) -> None:
    tokens = post(gw, "/tokenize", {"content": "Hello world"}, lane)
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert ids and all(isinstance(token, int) for token in ids)
    text = post(gw, "/detokenize", {"tokens": ids}, lane)
    assert text.status_code == 200, text.text
    assert text.json()["content"] == "Hello world"


@pytest.mark.parametrize("lane", list(LANES))
def test_apply_template_and_input_token_counts(gw: Gateway, lane: str) -> None:
    prompt = post(gw, "/apply-template", {"messages": CHAT}, lane)
    assert prompt.status_code == 200, prompt.text
    rendered = prompt.json()["prompt"]
    assert "Hi" in rendered and "<|im_start|>assistant" in rendered  # SmolLM2's ChatML template
    chat = post(gw, "/v1/chat/completions/input_tokens", {"model": "any", "messages": CHAT}, lane)
    assert chat.status_code == 200, chat.text
    assert chat.json()["object"] == "response.input_tokens"
    messages = post(gw, "/v1/messages/count_tokens", {"model": "any", "messages": CHAT}, lane)
    assert messages.status_code == 200, messages.text
    assert messages.json() == {"input_tokens": chat.json()["input_tokens"]}
    # the count is the rendered prompt's token count
    tokens = post(gw, "/tokenize", {"content": rendered, "parse_special": True}, lane).json()["tokens"]
    assert chat.json()["input_tokens"] == len(tokens)


@pytest.mark.parametrize("lane", list(LANES))
def test_infill_reaches_llama_server_which_needs_fim_tokens(gw: Gateway, lane: str) -> None:
    """SmolLM2 has no FIM tokens: llama-server's own 501 comes back through the gateway unchanged."""
    answer = post(gw, "/infill", {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n", "max_tokens": 2},
                  lane)
    assert answer.status_code == 501
    error = answer.json()["error"]
    assert error["type"] == "not_supported_error" and error["code"] == 501  # llama-server's shape, not ours
    assert error["message"].startswith("Infill is not supported by this model: prefix token is missing")


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("body", [{"input_suffix": "\n"}, {"input_prefix": "x"},
                                  {"input_prefix": 1, "input_suffix": ""},
                                  {"input_prefix": "", "input_suffix": "", "prompt": ["x"]}])
def test_infill_without_its_fields_is_our_400(gw: Gateway, lane: str, body: dict[str, Any]) -> None:
    answer = post(gw, "/infill", {**body, "max_tokens": 2}, lane)
    assert answer.status_code == 400, answer.text
    error = is_gateway_error(answer)
    assert error["code"] == "invalid_request" and error["param"] in ("input_prefix", "input_suffix", "prompt")


FEATURE_ROUTES = {"/v1/embeddings": ("EMBEDDINGS", {"input": "hello"}),
                  "/v1/rerank": ("RERANK", {"query": "q", "documents": ["a", "b"]}),
                  "/v1/reranking": ("RERANK", {"query": "q", "documents": ["a", "b"]}),
                  "/rerank": ("RERANK", {"query": "q", "documents": ["a", "b"]}),
                  "/reranking": ("RERANK", {"query": "q", "documents": ["a", "b"]})}


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("path", list(FEATURE_ROUTES))
def test_embeddings_and_rerank_off_are_a_501_naming_the_setting(gw: Gateway, lane: str, path: str) -> None:
    variable, body = FEATURE_ROUTES[path]
    answer = post(gw, path, body, lane)
    assert answer.status_code == 501, answer.text
    error = is_gateway_error(answer)
    assert error["code"] == "feature_not_enabled"
    assert f"{variable}=true" in error["message"] and path in error["message"]


# ------------------------------------------------------------------------------------------- never public

NEVER_PUBLIC = [
    ("POST", "/slots/0?action=erase"),
    ("POST", "/props"),
    ("POST", "/lora-adapters"),
    ("GET", "/tools"),
    ("POST", "/tools"),
    ("GET", "/cors-proxy?url=http://127.0.0.1:1/"),
    ("POST", "/models/load"),
    ("POST", "/models/unload"),
    ("POST", "/models"),
    ("DELETE", "/models?model=x"),
    ("POST", "/v1/audio/transcriptions"),
    ("GET", "/v1/stream?conv_id=x"),
    ("DELETE", "/v1/stream?conv_id=x"),
    ("POST", "/v1/streams/lookup"),
    ("POST", "/v1/chat/completions/control"),
]
BODIES = {"/slots/0": {"filename": "x.bin"}, "/props": {}, "/lora-adapters": [{"id": 0, "scale": 2.0}],
          "/tools": {"tool": "exec_shell_command", "params": {"command": "id"}}, "/models/load": {"model": "x"},
          "/models/unload": {"model": "x"}, "/models": {"model": "x"},
          "/v1/streams/lookup": {"conversation_ids": ["x"]},
          "/v1/chat/completions/control": {"id": "chatcmpl-x", "action": "reasoning_end"}}


@pytest.mark.parametrize("query", ["without", "with"])
@pytest.mark.parametrize(("method", "target"), NEVER_PUBLIC, ids=[f"{m} {t}" for m, t in NEVER_PUBLIC])
def test_never_public_routes_are_the_gateways_404(gw: Gateway, method: str, target: str, query: str) -> None:
    path, _, own_query = target.partition("?")
    url = f"{gw.url}{path}"
    if query == "with":
        url += f"?{own_query or 'lane=aiohttp'}"
    body = BODIES.get(path) if method in ("POST", "DELETE") else None
    answer = requests.request(method, url, json=body, headers=bearer(), timeout=10)
    assert answer.status_code in (404, 405), answer.text
    error = is_gateway_error(answer)
    assert error["code"] in ("not_found", "method_not_allowed")
    assert error["message"].startswith(("no route", "method")), error
    assert "File Not Found" not in answer.text  # llama-server's own 404


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("field", sorted(REFUSED_FIELDS))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
def test_refused_fields_are_a_400_field_not_allowed(gw: Gateway, lane: str, field: str, path: str) -> None:
    body: dict[str, Any] = {"model": "any", "max_tokens": 2}
    body.update({"input": "Hi"} if path == "/v1/responses" else {"messages": CHAT})
    value = {"id_slot": 0, "lora": [{"id": 0, "scale": 1.0}], "chat_format": 0, "chat_parser": "x",
             "reasoning_control": True}[field]
    answer = post(gw, path, {**body, field: value}, lane)
    assert answer.status_code == 400, answer.text
    if path == "/v1/messages":
        is_anthropic_error(answer.json(), "invalid_request_error")
        assert answer.json()["error"]["message"].startswith(f"{field} may not be set")
    else:
        error = is_gateway_error(answer)
        assert error["code"] == "field_not_allowed" and error["param"] == field


def backend_key(gw: Gateway) -> str:
    (pid,) = gw.backend_pids()
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(item.split(b"=", 1)[1].decode() for item in raw if item.startswith(b"LLAMA_API_KEY="))


def known_streams(gw: Gateway, conv_id: str) -> list[Any]:
    """What llama-server itself knows of a stream session (asked on its own port, with its per-boot key)."""
    answer = requests.post(f"http://127.0.0.1:{gw.port_backend}/v1/streams/lookup",
                           json={"conversation_ids": [conv_id]}, headers=bearer(backend_key(gw)), timeout=10)
    assert answer.status_code == 200, answer.text
    found = answer.json()
    entries = found if isinstance(found, list) else found.get("conversations", found.get("results", []))
    return [entry for entry in entries if isinstance(entry, dict) and entry.get("conversation_id") == conv_id
            and (entry.get("total_bytes") or entry.get("started_at") or entry.get("is_done") is not None)]


def test_the_stream_session_lookup_sees_a_session_opened_on_llama_server_itself(gw: Gateway) -> None:
    """The control for the next test: a stream sent straight to llama-server with X-Conversation-Id opens a
    session that its lookup reports (so an empty lookup below means the header never arrived)."""
    body = {"messages": CHAT, "max_tokens": 2, "stream": True}
    with requests.post(f"http://127.0.0.1:{gw.port_backend}/v1/chat/completions", json=body, stream=True,
                       headers={**bearer(backend_key(gw)), "X-Conversation-Id": "control-conv"}, timeout=60) as r:
        assert r.status_code == 200
        assert b"[DONE]" in b"".join(r.iter_content(None))
    assert known_streams(gw, "control-conv")


@pytest.mark.parametrize("lane", list(LANES))
def test_x_conversation_id_is_not_forwarded(gw: Gateway, lane: str) -> None:
    conv_id = f"conv-{lane}"
    body = {"messages": CHAT, "max_tokens": 2, "stream": True}
    answer = post(gw, "/v1/chat/completions", body, lane, headers={**bearer(), "X-Conversation-Id": conv_id})
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    assert b"data: [DONE]" in answer.content
    assert known_streams(gw, conv_id) == []
    replay = requests.get(f"{gw.url}/v1/stream", params={"conv_id": conv_id}, headers=bearer(), timeout=10)
    assert replay.status_code == 404 and is_gateway_error(replay)["code"] == "not_found"


# ------------------------------------------------------------------------------------------- token usage in /metrics


def sse_events(answer: Answer) -> list[dict[str, Any]]:
    events = []
    for line in answer.content.splitlines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def _chat(gw: Gateway, lane: str) -> tuple[int, int]:
    usage = oai(gw, lane).chat.completions.create(model="any", messages=CHAT, max_tokens=4).usage
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens


def _chat_stream(gw: Gateway, lane: str) -> tuple[int, int]:
    chunks = list(oai(gw, lane).chat.completions.create(model="any", messages=CHAT, max_tokens=4, stream=True,
                                                        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage is not None
    return usage.prompt_tokens, usage.completion_tokens


def _responses(gw: Gateway, lane: str) -> tuple[int, int]:
    usage = oai(gw, lane).responses.create(model="any", input="Say hi.", max_output_tokens=4).usage
    assert usage is not None
    return usage.input_tokens, usage.output_tokens


def _responses_stream(gw: Gateway, lane: str) -> tuple[int, int]:
    events = list(oai(gw, lane).responses.create(model="any", input="Say hi.", max_output_tokens=4, stream=True))
    usage = events[-1].response.usage
    assert events[-1].type == "response.completed" and usage is not None
    return usage.input_tokens, usage.output_tokens


def _messages(gw: Gateway, lane: str) -> tuple[int, int]:
    usage = claude(gw, lane).messages.create(model="any", max_tokens=4, messages=CHAT).usage
    return usage.input_tokens + (usage.cache_read_input_tokens or 0), usage.output_tokens


def _messages_stream(gw: Gateway, lane: str) -> tuple[int, int]:
    with claude(gw, lane).messages.stream(model="any", max_tokens=4, messages=CHAT) as stream:
        usage = stream.get_final_message().usage
    return usage.input_tokens + (usage.cache_read_input_tokens or 0), usage.output_tokens


SHAPES = {"chat": _chat, "chat-stream": _chat_stream, "responses": _responses,
          "responses-stream": _responses_stream, "messages": _messages, "messages-stream": _messages_stream}


@pytest.mark.parametrize("lane", list(LANES))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_token_usage_of_every_shape_lands_in_metrics(gw: Gateway, lane: str, shape: str) -> None:
    before = scrape(gw)
    prompt, completion = SHAPES[shape](gw, lane)
    after = scrape(gw)
    assert prompt > 0 and completion > 0
    assert after["tokens_prompt_total"] - before["tokens_prompt_total"] == prompt
    assert after["tokens_completion_total"] - before["tokens_completion_total"] == completion


@pytest.mark.parametrize("lane", list(LANES))
def test_the_anthropic_stream_is_anthropics_event_stream(gw: Gateway, lane: str) -> None:
    """The raw events of a streamed /v1/messages: message_start carries the input tokens, message_delta the
    output tokens (the head and the tail that gateway/usage.py reads)."""
    answer = post(gw, "/v1/messages", {"model": "any", "max_tokens": 4, "messages": CHAT, "stream": True}, lane)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(answer)
    kinds = [event["type"] for event in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert "content_block_delta" in kinds
    assert "input_tokens" in events[0]["message"]["usage"]
    assert events[kinds.index("message_delta")]["usage"]["output_tokens"] > 0
