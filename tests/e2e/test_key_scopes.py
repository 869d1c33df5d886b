"""Per-key scopes, token budgets and concurrency (the keys file's options), in both lanes, against a real gateway and
the fake backend (bench/fake_llama_server.py: 12 prompt tokens, one completion token per content event)."""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from tests.conftest import Gateway
from tests.e2e.test_attack_defects import BENCH_FAKE

FULL = "sk-scope-full-0123456789"
SMOL = "sk-scope-smol-0123456789"
QWEN = "sk-scope-qwen-0123456789"
EMBED = "sk-scope-embed-0123456789"
TOKEN = "sk-scope-tokenize-0123456789"
BUDGET = "sk-scope-budget-0123456789"
ONE = "sk-scope-one-at-a-time-0123456789"
CHUNKS = 10  # completion tokens of each fake answer; 12 prompt tokens
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
LANES = ["fast", "aiohttp"]


@pytest.fixture(scope="module")
def lanes() -> Iterator[dict[str, Gateway]]:
    work = Path(tempfile.mkdtemp(prefix="scopes-"))
    keys = work / "api_keys.txt"
    keys.write_text(
        f"full:{FULL}\n"
        f"smol:{SMOL} models=SmolLM2-*\n"
        f"qwen:{QWEN} models=qwen*,llama-3-8b\n"
        f"embed:{EMBED} routes=embeddings\n"
        f"tokenize:{TOKEN} routes=tokenize\n"
        f"budget:{BUDGET} tokens_per_minute=30\n"  # an answer is 22 tokens: the second one crosses it
        f"one:{ONE} max_concurrent=1\n")
    keys.chmod(0o600)
    env = {"LLAMA_SERVER_BIN": str(BENCH_FAKE), "AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(keys),
           "MAX_REQUESTS_PER_MINUTE": "100000", "MAX_TOKENS": "64",
           "EXTRA_ARGS": f"--stream-chunks {CHUNKS} --token-interval 0.05"}
    gateways = {"fast": Gateway(work / "fast", {**env, "FAST_LANE": "true"}).start(timeout=60),
                "aiohttp": Gateway(work / "aiohttp", {**env, "FAST_LANE": "false"}).start(timeout=60)}
    yield gateways
    for gw in gateways.values():
        gw.stop()


def post(gw: Gateway, key: str, path: str = "/v1/chat/completions", **body: object) -> requests.Response:
    return requests.post(gw.url + path, json={**CHAT, **body}, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def error(resp: requests.Response) -> dict:
    return resp.json()["error"]


@pytest.mark.parametrize("lane", LANES)
def test_a_key_uses_only_its_models(lanes: dict[str, Gateway], lane: str) -> None:
    gw = lanes[lane]
    assert post(gw, FULL).status_code == 200
    assert post(gw, SMOL).status_code == 200  # SmolLM2-* matches the served model's id
    refused = post(gw, QWEN)
    assert refused.status_code == 403
    assert error(refused)["type"] == "permission_error" and error(refused)["code"] == "model_not_allowed"
    assert error(refused)["message"].startswith("this API key may not use the model SmolLM2-135M-Instruct")
    assert "it may use: qwen*, llama-3-8b" in error(refused)["message"]


@pytest.mark.parametrize("lane", LANES)
def test_the_model_list_shows_only_the_models_a_key_may_use(lanes: dict[str, Gateway], lane: str) -> None:
    gw = lanes[lane]
    for key, count in ((FULL, 1), (SMOL, 1), (QWEN, 0), (EMBED, 1)):
        listed = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0).models.list()
        assert len(listed.data) == count, key
    one = requests.get(gw.url + "/v1/models/any", headers={"Authorization": f"Bearer {QWEN}"}, timeout=10)
    assert one.status_code == 403 and error(one)["code"] == "model_not_allowed"


@pytest.mark.parametrize("lane", LANES)
def test_a_key_uses_only_its_route_groups(lanes: dict[str, Gateway], lane: str) -> None:
    gw = lanes[lane]
    chat = post(gw, EMBED)
    assert chat.status_code == 403 and error(chat)["code"] == "route_not_allowed"
    assert error(chat)["message"] == ("this API key may not use /v1/chat/completions (route group inference); its "
                                      "route groups: embeddings")
    tokenize = requests.post(gw.url + "/tokenize", json={"content": "hi"},
                             headers={"Authorization": f"Bearer {FULL}"}, timeout=10)
    assert tokenize.status_code == 403 and "route group tokenize" in error(tokenize)["message"]
    allowed = requests.post(gw.url + "/tokenize", json={"content": "hi"},
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert allowed.status_code != 403  # reached the backend (the fake has no /tokenize)
    admin = requests.post(gw.url + "/reload", headers={"Authorization": f"Bearer {FULL}"}, timeout=10)
    assert admin.status_code == 403 and error(admin)["code"] == "admin_key_required"
    messages = requests.post(gw.url + "/v1/messages", headers={"x-api-key": EMBED}, timeout=10,
                             json={"model": "m", "max_tokens": 4, "messages": CHAT["messages"]})
    assert messages.status_code == 403 and messages.json()["type"] == "error"  # Anthropic's error shape
    assert messages.json()["error"]["type"] == "permission_error"


def stream(gw: Gateway, key: str) -> tuple[int, list[dict], bool]:
    """A streamed chat, read to its end: the status, the usage seen, and whether [DONE] came."""
    resp = requests.post(gw.url + "/v1/chat/completions", stream=True, timeout=30,
                         json={**CHAT, "stream": True, "stream_options": {"include_usage": True}},
                         headers={"Authorization": f"Bearer {key}"})
    usage, done = [], False
    for line in resp.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            event = json.loads(line[6:])
            if event.get("usage"):
                usage.append(event["usage"])
        done = done or line == b"data: [DONE]"
    return resp.status_code, usage, done


@pytest.mark.parametrize("lane", LANES)
def test_a_token_budget_spent_mid_stream_lets_the_stream_finish_and_refuses_the_next(
        lanes: dict[str, Gateway], lane: str) -> None:
    gw = lanes[lane]
    for _ in range(2):  # 0, then 22 of 30 tokens spent: both start, and the second crosses the budget
        status, usage, done = stream(gw, BUDGET)
        assert status == 200 and done and usage[-1]["total_tokens"] == 12 + CHUNKS
    refused = post(gw, BUDGET)
    assert refused.status_code == 429 and error(refused)["code"] == "token_budget_exceeded"
    assert error(refused)["type"] == "rate_limit_error"
    assert "30 tokens per minute" in error(refused)["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert post(gw, FULL).status_code == 200  # another key's budget is its own


@pytest.mark.parametrize("lane", LANES)
def test_max_concurrent_refuses_a_second_request_while_the_first_runs(lanes: dict[str, Gateway], lane: str) -> None:
    gw = lanes[lane]
    first = requests.post(gw.url + "/v1/chat/completions", stream=True, timeout=30, json={**CHAT, "stream": True},
                          headers={"Authorization": f"Bearer {ONE}"})
    assert first.status_code == 200
    lines = first.iter_lines()
    next(lines)  # under way (its events come 0.05 s apart)
    second = post(gw, ONE)
    assert second.status_code == 429 and error(second)["code"] == "too_many_concurrent_requests"
    assert second.headers["Retry-After"] == "1"
    for _ in lines:  # the first one ends
        pass
    deadline = time.monotonic() + 5
    while (after := post(gw, ONE)).status_code != 200:  # its place is given back when it is recorded
        assert time.monotonic() < deadline, after.text
        time.sleep(0.05)


def test_two_lanes_refuse_alike_under_concurrent_load(lanes: dict[str, Gateway]) -> None:
    """The fast lane hands every scope refusal to aiohttp's lane: the same answer whichever lane a request took."""
    seen: dict[str, set[tuple[int, str]]] = {lane: set() for lane in LANES}

    def run(lane: str) -> None:
        for key in (QWEN, EMBED):
            resp = post(lanes[lane], key)
            seen[lane].add((resp.status_code, error(resp)["code"]))

    threads = [threading.Thread(target=run, args=(lane,)) for lane in LANES for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert seen["fast"] == seen["aiohttp"] == {(403, "model_not_allowed"), (403, "route_not_allowed")}
