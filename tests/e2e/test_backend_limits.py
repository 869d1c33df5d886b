"""MAX_TOKENS and SHARED_PROMPT_CACHE against the real llama-server and default model."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import requests

from tests.conftest import Gateway

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow, one per line, and explain each one."}]


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(tmp_path_factory.mktemp("capped"), {"MAX_TOKENS": "5", "SHARED_PROMPT_CACHE": "false"}).start()
    yield gw
    gw.stop()


def usage(gw: Gateway, **extra: object) -> dict:
    resp = requests.post(f"{gw.url}/v1/chat/completions", json={"model": "any", "messages": PROMPT, **extra},
                         timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


@pytest.mark.parametrize("extra", [{}, {"max_tokens": -1}, {"n_predict": -1}],
                         ids=["unset", "max_tokens=-1", "n_predict=-1"])
def test_a_request_without_a_cap_stops_at_max_tokens(capped: Gateway, extra: dict) -> None:
    """Before: no max_tokens (or -1) generated until the end of the context."""
    answer = usage(capped, **extra)
    assert answer["usage"]["completion_tokens"] <= 5
    assert answer["choices"][0]["finish_reason"] == "length"


def test_a_request_over_max_tokens_is_refused_by_the_official_client(capped: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{capped.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="any", messages=PROMPT, max_tokens=6)  # type: ignore[arg-type]
    assert "MAX_TOKENS" in str(caught.value)
    assert client.chat.completions.create(model="any", messages=PROMPT,  # type: ignore[arg-type]
                                          max_tokens=5).usage.completion_tokens <= 5


def cached(answer: dict) -> int:
    return int((answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def test_the_prompt_cache_is_shared_by_default(gateway: Gateway) -> None:
    """What SHARED_PROMPT_CACHE=false exists for: one caller can see that another sent the same prompt."""
    usage(gateway, max_tokens=1, temperature=0)
    assert cached(usage(gateway, max_tokens=1, temperature=0)) > 0


def test_shared_prompt_cache_off_reuses_no_prompt(capped: Gateway) -> None:
    usage(capped, max_tokens=1, temperature=0)
    again = usage(capped, max_tokens=1, temperature=0)
    assert cached(again) == 0
    assert again.get("timings", {}).get("cache_n", 0) == 0
