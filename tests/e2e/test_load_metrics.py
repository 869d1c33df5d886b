"""The load balancers' gauges (gateway.loadmetrics) during and after a real stream through the real backend."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway

MAX_TOKENS = 48
SCRAPE_AT = (4, 16, 32)  # content chunks received when the gateway is scraped
TOLERANCE = 12  # tokens llama-server may generate between the chunk read and the scrape (and the first's role chunk)


def prometheus(gw: Gateway) -> dict[str, dict[str, float]]:
    """{series: {model: value}} for the four load gauges."""
    text = requests.get(f"{gw.url}/metrics?format=prometheus", timeout=10).text
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("gateway_queued_requests", "gateway_kv_cache_utilization", "gateway_running_requests",
                           "gateway_slots_total"):
            out[family.name] = {s.labels["model"]: s.value for s in family.samples}
    return out


def load(gw: Gateway) -> dict[str, object]:
    loads = requests.get(f"{gw.url}/metrics", timeout=10).json()["load"]
    assert len(loads) == 1
    return next(iter(loads.values()))


def test_the_kv_gauge_follows_a_stream_and_drops_to_zero_after_it(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()  # CTX=4096, PARALLEL=4: one unified buffer of 4096 tokens
    before = prometheus(gw)
    (model,) = before["gateway_slots_total"]
    assert before["gateway_slots_total"][model] == 4
    assert before["gateway_kv_cache_utilization"][model] == 0.0
    assert before["gateway_running_requests"][model] == 0 and before["gateway_queued_requests"][model] == 0

    body = {"model": "any", "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "max_tokens": MAX_TOKENS, "stream": True, "ignore_eos": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    seen: list[tuple[int, float, dict[str, object]]] = []  # (chunks so far, kv gauge, JSON load)
    chunks, usage = 0, None
    deadline = time.monotonic() + 120
    with requests.post(f"{gw.url}/v1/chat/completions", json=body, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            assert time.monotonic() < deadline
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
                chunks += 1
                if chunks in SCRAPE_AT:
                    during = prometheus(gw)
                    assert during["gateway_running_requests"][model] == 1
                    seen.append((chunks, during["gateway_kv_cache_utilization"][model], load(gw)))
    assert usage is not None and usage["completion_tokens"] == MAX_TOKENS
    prompt = usage["prompt_tokens"]

    assert [k for k, _, _ in seen] == list(SCRAPE_AT)
    gauges = [kv for _, kv, _ in seen]
    assert gauges[0] > 0 and gauges == sorted(gauges) and gauges[-1] > gauges[0]
    for k, kv, during in seen:
        # tokens held by the running slot: the prompt plus what it generated so far
        held = during["kv_tokens_held"]
        assert isinstance(held, int) and prompt + k - 2 <= held <= prompt + k + TOLERANCE, (k, prompt, held)
        assert during["n_ctx"] == 4096 and during["running_requests"] == 1
        assert prompt + k - 2 <= kv * 4096 <= prompt + k + TOLERANCE, (k, prompt, kv)

    # After the stream: the slot is idle and keeps its tokens for prompt reuse; they are not counted as held.
    for _ in range(50):
        after = load(gw)
        if after["running_requests"] == 0:
            break
        time.sleep(0.1)
    assert after["running_requests"] == 0 and after["kv_tokens_held"] == 0
    assert after["kv_cache_utilization"] == 0.0 and after["queued_requests"] == 0
    assert isinstance(after["kv_tokens_cached_idle"], int)
    assert prompt + MAX_TOKENS - 2 <= after["kv_tokens_cached_idle"] <= prompt + MAX_TOKENS
    final = prometheus(gw)
    assert final["gateway_kv_cache_utilization"][model] == 0.0 and final["gateway_running_requests"][model] == 0
