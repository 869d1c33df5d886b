"""Metrics, request ids and the access log, after real requests through the real backend."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Gateway

KEY = "sk-observe-0123456789abcdef"
ONE = "sk-onlyone-0123456789abcdef"
CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    data = tmp_path_factory.mktemp("observed")
    (data / "api_keys.txt").write_text(f"observer:{KEY}:1000\nsingle:{ONE}:1\n")
    gw = Gateway(data, {"AUTH_ENABLED": "true", "LOG_FORMAT": "json", "WORKER_TYPE": "obs"}).start()
    yield gw
    gw.stop()


def scrape(gw: Gateway, accept: str = "text/plain") -> dict[str, list]:
    resp = requests.get(f"{gw.url}/metrics", headers={"Accept": accept}, timeout=10)
    assert resp.status_code == 200
    families: dict[str, list] = {}
    for family in text_string_to_metric_families(resp.text):
        families.setdefault(family.name, []).extend(family.samples)
    return families


def value(families: dict[str, list], sample: str, **labels: str) -> float:
    return sum(s.value for fam in families.values() for s in fam
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_after_real_requests(observed: Gateway) -> None:
    before = scrape(observed)
    client = openai.OpenAI(base_url=f"{observed.url}/v1", api_key=KEY, max_retries=0)
    plain = client.chat.completions.create(model="any", messages=CHAT, max_tokens=8)
    seen_completion = plain.usage.completion_tokens
    seen_prompt = plain.usage.prompt_tokens
    streams = 2
    for _ in range(streams):
        stream = client.chat.completions.create(model="any", messages=CHAT, max_tokens=8, stream=True,
                                                stream_options={"include_usage": True})
        usage = [c.usage for c in stream if c.usage is not None][-1]
        seen_completion += usage.completion_tokens
        seen_prompt += usage.prompt_tokens
    assert requests.get(f"{observed.url}/v1/models", timeout=5).status_code == 401  # no key
    assert requests.get(f"{observed.url}/v1/models", headers={"Authorization": f"Bearer {ONE}"}, timeout=5).ok
    assert requests.get(f"{observed.url}/v1/models", headers={"Authorization": f"Bearer {ONE}"},
                        timeout=5).status_code == 429
    after = scrape(observed)

    def delta(sample: str, **labels: str) -> float:
        return value(after, sample, **labels) - value(before, sample, **labels)

    chat = "/v1/chat/completions"
    assert delta("gateway_requests_total", route=chat, status="200", key_id="observer") == 1 + streams
    assert delta("gateway_requests_total", route="/v1/models", status="401", key_id="none") == 1
    assert delta("gateway_requests_total", route="/v1/models", status="429", key_id="single") == 1
    assert delta("gateway_rejections_total", reason="auth") == 1
    assert delta("gateway_rejections_total", reason="rate") == 1
    assert delta("gateway_request_duration_seconds_count", route=chat) == 1 + streams
    assert delta("gateway_time_to_first_token_seconds_count", route=chat) == streams
    assert delta("gateway_queue_wait_seconds_count") == 1 + streams
    assert delta("gateway_completion_tokens_total", key_id="observer") == seen_completion
    assert delta("gateway_prompt_tokens_total", key_id="observer") == seen_prompt
    assert delta("gateway_generation_tokens_per_second_count") >= 1
    assert value(after, "gateway_backend_up") == 1 and value(after, "gateway_backend_ready") == 1
    assert value(after, "gateway_requests_in_flight") == 0 and value(after, "gateway_queue_depth") == 0
    assert value(after, "gateway_uptime_seconds") > 0
    assert any(name.startswith("llamacpp:") for name in after)  # llama-server's own series, same scrape


def test_no_key_in_metrics_or_health(observed: Gateway) -> None:
    requests.get(f"{observed.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=5)
    text = requests.get(f"{observed.url}/metrics", headers={"Accept": "text/plain"}, timeout=10).text
    text += requests.get(f"{observed.url}/metrics", timeout=10).text + requests.get(f"{observed.url}/health").text
    assert KEY not in text and ONE not in text
    assert 'key_id="observer"' in text


def test_openmetrics_and_json(observed: Gateway) -> None:
    om = requests.get(f"{observed.url}/metrics", headers={"Accept": "application/openmetrics-text"}, timeout=10)
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    seed = requests.get(f"{observed.url}/metrics", timeout=10).json()
    for field in ("requests_total", "requests_success", "requests_error", "requests_active", "queue_depth",
                  "queue_rejections", "uptime_seconds", "tokens_completion_total"):
        assert field in seed


def test_request_id_round_trip(observed: Gateway) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    given = requests.get(f"{observed.url}/v1/models", headers={**auth, "X-Request-ID": "trace-42.a:b"}, timeout=5)
    assert given.headers["X-Request-ID"] == "trace-42.a:b"
    made = requests.get(f"{observed.url}/v1/models", headers=auth, timeout=5).headers["X-Request-ID"]
    assert made and made != "trace-42.a:b"
    hostile = requests.get(f"{observed.url}/ping", headers={"X-Request-ID": "a b<script>" + "x" * 500}, timeout=5)
    rid = hostile.headers["X-Request-ID"]
    assert len(rid) <= 128 and " " not in rid and "<" not in rid
    stream = requests.post(f"{observed.url}/v1/chat/completions", timeout=30, headers={**auth, "X-Request-ID": "s-1"},
                           json={"model": "any", "messages": CHAT, "max_tokens": 4, "stream": True})
    assert stream.headers["X-Request-ID"] == "s-1"
    denied = requests.get(f"{observed.url}/v1/models", headers={"X-Request-ID": "d-1"}, timeout=5)
    assert denied.status_code == 401 and denied.headers["X-Request-ID"] == "d-1"


def test_access_log_line_per_request(observed: Gateway) -> None:
    log_file = observed.data_dir / "logs" / "llama-obs" / "access.log"
    auth = {"Authorization": f"Bearer {KEY}"}
    ids = [f"acc-{i}" for i in range(3)]
    requests.post(f"{observed.url}/v1/chat/completions", headers={**auth, "X-Request-ID": ids[0]}, timeout=30,
                  json={"model": "any", "messages": CHAT, "max_tokens": 4, "stream": True})
    requests.post(f"{observed.url}/v1/completions", headers={**auth, "X-Request-ID": ids[1]}, timeout=30,
                  json={"model": "any", "prompt": "Hello", "max_tokens": 4})
    requests.get(f"{observed.url}/v1/models", headers={"X-Request-ID": ids[2]}, timeout=5)
    deadline = time.monotonic() + 5
    records: dict[str, dict] = {}
    while len(records) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
        lines = log_file.read_text().splitlines() if log_file.exists() else []
        records = {r["request_id"]: r for r in map(json.loads, lines) if r["request_id"] in ids}
    assert set(records) == set(ids)
    streamed, whole, denied = (records[i] for i in ids)
    assert streamed["key_id"] == "observer" and streamed["status"] == 200 and streamed["ttft_ms"] > 0
    assert streamed["completion_tokens"] > 0 and streamed["path"] == "/v1/chat/completions"
    assert whole["method"] == "POST" and whole["completion_tokens"] > 0 and whole["duration_ms"] > 0
    assert denied["status"] == 401 and denied["key_id"] is None
    text = log_file.read_text()
    assert KEY not in text and "Hello" not in text and "Say hello" not in text  # no keys, no prompts


def test_text_access_log(gateway: Gateway) -> None:
    requests.get(f"{gateway.url}/v1/models", headers={"X-Request-ID": "text-log-1"}, timeout=5)
    log_file = gateway.data_dir / "logs" / "llama" / "access.log"
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        text = log_file.read_text() if log_file.exists() else ""
        lines = [line for line in text.splitlines() if "text-log-1" in line]
        if lines:
            break
        time.sleep(0.1)
    (line,) = lines
    assert "GET /v1/models 200" in line and "anonymous" in line


def test_in_flight_and_queue_gauges_follow_the_gate(observed: Gateway) -> None:
    body = {"model": "any", "prompt": "Tell a long story:", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with requests.post(f"{observed.url}/v1/completions", json=body, stream=True, timeout=60,
                       headers={"Authorization": f"Bearer {KEY}"}) as resp:
        lines = resp.iter_lines()  # kept alive: dropping the generator closes the connection, ending the stream
        assert next(line for line in lines if line).startswith(b"data: ")
        during = scrape(observed)
        rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"
    assert value(during, "gateway_requests_in_flight") == 1
    assert value(during, "gateway_queue_depth") == 0
    assert value(scrape(observed), "gateway_requests_in_flight") == 0
