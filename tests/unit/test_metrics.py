from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from gateway.metrics import (
    CONTENT_TYPE_OPENMETRICS,
    CONTENT_TYPE_TEXT,
    Metrics,
    backend_to_openmetrics,
    negotiate,
    relabel_backend_metrics,
    wants_openmetrics,
)

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                     "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")

# Recorded from llama-server (the build this project uses) started with --metrics, plus the per-position spec-decode
# series it prints once speculative decoding accepted tokens.
LLAMA_METRICS = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 34
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 32
# HELP llamacpp:n_tokens_max Largest observed sequence length (prompt + generation)
# TYPE llamacpp:n_tokens_max counter
llamacpp:n_tokens_max 38
# HELP llamacpp:prompt_tokens_seconds Average prompt throughput in tokens/s
# TYPE llamacpp:prompt_tokens_seconds gauge
llamacpp:prompt_tokens_seconds 308.6
# HELP llamacpp:predicted_tokens_seconds Average generation throughput in tokens/s
# TYPE llamacpp:predicted_tokens_seconds gauge
llamacpp:predicted_tokens_seconds nan
# HELP llamacpp:requests_processing Number of requests processing
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
# HELP llamacpp:requests_deferred Number of requests deferred
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 0
# HELP llamacpp:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position
# TYPE llamacpp:spec_decode_num_accepted_tokens_per_pos_total counter
llamacpp:spec_decode_num_accepted_tokens_per_pos_total{position="0"} 3
"""

def fresh() -> Metrics:
    return Metrics(CollectorRegistry())


def samples(metrics: Metrics, accept: str = "", backend: str = "") -> dict[str, list[Sample]]:
    body, content_type = metrics.render(accept, backend)
    assert content_type == CONTENT_TYPE_TEXT
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list[Sample]], name: str, **labels: str) -> float:
    matches = [s.value for s in found.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


def test_requests_counted_by_route_status_and_key() -> None:
    m = fresh()
    m.observe_request("/v1/chat/completions", 200, "alice", 0.3)
    m.observe_request("/v1/chat/completions", 200, "alice", 1.5)
    m.observe_request("/v1/chat/completions", 429, "bob", 0.001)
    m.observe_request("/v1/secret/thing", "404", None, 0.002)
    found = samples(m)
    assert value(found, "gateway_requests_total", route="/v1/chat/completions", status="200", key_id="alice") == 2
    assert value(found, "gateway_requests_total", route="/v1/chat/completions", status="429", key_id="bob") == 1
    assert value(found, "gateway_requests_total", route="other", status="404", key_id="none") == 1
    route = {"route": "/v1/chat/completions"}
    assert value(found, "gateway_request_duration_seconds_count", **route) == 3
    assert value(found, "gateway_request_duration_seconds_sum", **route) == pytest.approx(1.801)
    assert value(found, "gateway_request_duration_seconds_bucket", le="0.5", **route) == 2
    assert value(found, "gateway_request_duration_seconds_bucket", le="600.0", **route) == 3
    assert value(found, "gateway_request_duration_seconds_bucket", le="+Inf", **route) == 3
    # every known route is there from the start, so dashboards see zeros rather than gaps
    assert value(found, "gateway_request_duration_seconds_count", route="/v1/embeddings") == 0


def test_ttft_queue_and_gauges() -> None:
    m = fresh()
    m.observe_ttft("/v1/chat/completions", 0.004)
    m.observe_ttft("/v1/chat/completions", 0.2)
    m.observe_queue_wait(0.03)
    m.set_queue_depth(3)
    m.set_in_flight(1)
    found = samples(m)
    route = {"route": "/v1/chat/completions"}
    assert value(found, "gateway_time_to_first_token_seconds_bucket", le="0.005", **route) == 1
    assert value(found, "gateway_time_to_first_token_seconds_bucket", le="60.0", **route) == 2
    assert value(found, "gateway_time_to_first_token_seconds_count", **route) == 2
    assert value(found, "gateway_queue_wait_seconds_bucket", le="0.025") == 0
    assert value(found, "gateway_queue_wait_seconds_bucket", le="0.05") == 1
    assert value(found, "gateway_queue_depth") == 3
    assert value(found, "gateway_requests_in_flight") == 1


def test_rejections_by_fixed_reasons() -> None:
    m = fresh()
    m.reject("rate")
    m.reject("rate")
    m.reject("queue_full")
    m.reject("something new")
    found = samples(m)
    assert value(found, "gateway_rejections_total", reason="rate") == 2
    assert value(found, "gateway_rejections_total", reason="queue_full") == 1
    assert value(found, "gateway_rejections_total", reason="other") == 1
    assert value(found, "gateway_rejections_total", reason="auth") == 0  # present before the first refusal
    assert {s.labels["reason"] for s in found["gateway_rejections_total"]} == {
        "auth", "rate", "scope", "budget", "queue_full", "queue_timeout", "size", "invalid", "connections", "other"}


def test_tokens_and_generation_speed() -> None:
    m = fresh()
    m.observe_tokens("alice", "smol", 31, 8, 0.05)  # 160 tokens/s
    m.observe_tokens("alice", "smol", 10, 0, 0.0)  # an embedding: prompt only, no speed
    m.observe_tokens("bob", None, 5, 4, 0.0)  # generation time unknown: no speed
    found = samples(m)
    assert value(found, "gateway_prompt_tokens_total", key_id="alice", model="smol") == 41
    assert value(found, "gateway_completion_tokens_total", key_id="alice", model="smol") == 8
    assert value(found, "gateway_completion_tokens_total", key_id="bob", model="unknown") == 4
    assert value(found, "gateway_generation_tokens_per_second_count") == 1
    assert value(found, "gateway_generation_tokens_per_second_sum") == pytest.approx(160.0)
    assert value(found, "gateway_generation_tokens_per_second_bucket", le="150.0") == 0
    assert value(found, "gateway_generation_tokens_per_second_bucket", le="200.0") == 1


def test_key_id_and_model_cardinality_is_capped() -> None:
    m = Metrics(CollectorRegistry(), max_key_ids=3, max_models=1)
    for i in range(10):
        m.observe_request("/v1/models", 200, f"key{i}", 0.01)
        m.observe_tokens(f"key{i}", f"model{i}", 1, 1, 0.0)
    m.observe_request("/v1/models", 200, "key1", 0.01)  # a key seen before the cap keeps its own series
    found = samples(m)
    keys = {s.labels["key_id"]: s.value for s in found["gateway_requests_total"]}
    assert keys == {"key0": 1, "key1": 2, "key2": 1, "other": 7}
    assert {s.labels["model"] for s in found["gateway_prompt_tokens_total"]} == {"model0", "other"}


def test_backend_source_read_at_scrape_time() -> None:
    m = fresh()
    assert "gateway_backend_up" not in samples(m)  # no source yet: no made-up values
    state = [False, False, 0]
    m.set_backend_source(lambda: (bool(state[0]), bool(state[1]), int(state[2])))
    found = samples(m)
    assert value(found, "gateway_backend_up") == 0 and value(found, "gateway_backend_restarts_total") == 0
    state[:] = [True, True, 2]
    found = samples(m)
    assert value(found, "gateway_backend_up") == 1
    assert value(found, "gateway_backend_ready") == 1
    assert value(found, "gateway_backend_restarts_total") == 2


def test_a_failing_backend_source_does_not_break_the_scrape() -> None:
    m = fresh()

    def broken() -> tuple[bool, bool, int]:
        raise RuntimeError("boom")

    m.set_backend_source(broken)
    found = samples(m)
    assert "gateway_backend_up" not in found and "gateway_uptime_seconds" in found


def test_uptime_from_the_injected_clock() -> None:
    now = [100.0]
    m = Metrics(CollectorRegistry(), clock=lambda: now[0])
    now[0] = 142.5
    assert value(samples(m), "gateway_uptime_seconds") == 42.5


def test_registries_are_independent() -> None:
    a, b = fresh(), fresh()
    a.reject("auth")
    assert value(samples(b), "gateway_rejections_total", reason="auth") == 0


def test_relabel_keeps_only_llamacpp_series() -> None:
    text = ("# HELP process_cpu_seconds_total CPU\n# TYPE process_cpu_seconds_total counter\n"
            "process_cpu_seconds_total 1.5\n" + LLAMA_METRICS + "# some comment\nrandom_gauge 3\n\n")
    kept = relabel_backend_metrics(text)
    assert kept.endswith("\n")
    assert "process_cpu" not in kept and "random_gauge" not in kept and "some comment" not in kept
    assert kept == LLAMA_METRICS
    assert relabel_backend_metrics("up 1\n") == ""


def test_prometheus_text_with_backend_series() -> None:
    m = fresh()
    m.observe_request("/v1/completions", 200, "alice", 0.1)
    body, content_type = m.render("text/plain", relabel_backend_metrics(LLAMA_METRICS))
    assert content_type == CONTENT_TYPE_TEXT
    assert body.endswith(LLAMA_METRICS.encode())
    found = samples(m, backend=relabel_backend_metrics(LLAMA_METRICS))
    assert value(found, "llamacpp:requests_processing") == 1
    assert value(found, "llamacpp:tokens_predicted_total") == 32
    assert value(found, "gateway_requests_total", route="/v1/completions", status="200", key_id="alice") == 1


def test_openmetrics_when_asked_and_backend_before_eof() -> None:
    m = fresh()
    m.observe_request("/v1/completions", 200, "alice", 0.1)
    m.set_backend_source(lambda: (True, True, 1))
    body, content_type = m.render(PROMETHEUS_ACCEPT, relabel_backend_metrics(LLAMA_METRICS))
    assert content_type == CONTENT_TYPE_OPENMETRICS
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("\n# EOF\n") and text.count("# EOF") == 1
    # the strict OpenMetrics parser accepts the whole answer, backend series included
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["gateway_requests"].type == "counter"
    assert families["gateway_backend_restarts"].samples[0].value == 1
    prompt = families["llamacpp:prompt_tokens"]
    assert prompt.type == "counter" and prompt.samples[0].name == "llamacpp:prompt_tokens_total"
    assert prompt.samples[0].value == 34
    # a counter without _total (a high-water mark) keeps its sample name as a gauge
    assert families["llamacpp:n_tokens_max"].type == "gauge"
    assert families["llamacpp:n_tokens_max"].samples[0].name == "llamacpp:n_tokens_max"
    assert families["llamacpp:predicted_tokens_seconds"].samples[0].value != 0  # NaN survives
    per_pos = families["llamacpp:spec_decode_num_accepted_tokens_per_pos"].samples[0]
    assert per_pos.labels == {"position": "0"} and per_pos.value == 3


def test_openmetrics_without_backend_text() -> None:
    body, content_type = fresh().render("application/openmetrics-text", "")
    assert content_type == CONTENT_TYPE_OPENMETRICS and body.endswith(b"# EOF\n")
    # an explicit choice (e.g. ?format=) wins over the Accept header
    assert fresh().render("*/*", openmetrics=True)[1] == CONTENT_TYPE_OPENMETRICS
    assert fresh().render(PROMETHEUS_ACCEPT, openmetrics=False)[1] == CONTENT_TYPE_TEXT
    assert backend_to_openmetrics("") == ""


@pytest.mark.parametrize(("accept", "expected"), [
    (None, False), ("", False), ("*/*", False), ("text/plain;version=0.0.4", False),
    ("application/openmetrics-text", True), (PROMETHEUS_ACCEPT, True),
    ("text/plain, application/openmetrics-text; version=1.0.0", True),
    ("application/openmetrics-textual", False),
])
def test_wants_openmetrics(accept: str | None, expected: bool) -> None:
    assert wants_openmetrics(accept) is expected


@pytest.mark.parametrize(("accept", "requested", "expected"), [
    (None, None, "json"), ("", None, "json"), ("*/*", None, "json"), ("application/json", None, "json"),
    ("text/html,application/xhtml+xml,*/*;q=0.8", None, "json"),
    (PROMETHEUS_ACCEPT, None, "openmetrics"), ("text/plain;version=0.0.4;q=1,*/*;q=0.1", None, "prometheus"),
    ("Text/Plain", None, "prometheus"),
    (PROMETHEUS_ACCEPT, "json", "json"), ("*/*", "prometheus", "prometheus"), ("*/*", "openmetrics", "openmetrics"),
    ("*/*", "xml", "json"),
])
def test_negotiate(accept: str | None, requested: str | None, expected: str) -> None:
    assert negotiate(accept, requested) == expected


def test_json_snapshot_keeps_the_seed_fields() -> None:
    m = fresh()
    m.observe_tokens("alice", "smol", 31, 8, 0.05)
    m.reject("queue_timeout")
    m.set_backend_source(lambda: (True, True, 3))
    base = {"requests_total": 5, "requests_success": 4, "requests_error": 1, "requests_active": 0, "queue_depth": 0,
            "queue_rejections": 1, "uptime_seconds": 12.5}
    snap = m.json_snapshot(dict(base))
    assert {k: snap[k] for k in base} == base
    assert snap["tokens_prompt_total"] == 31 and snap["tokens_completion_total"] == 8
    assert snap["rejections"] == {"auth": 0, "rate": 0, "scope": 0, "budget": 0, "queue_full": 0, "queue_timeout": 1,
                                  "size": 0, "invalid": 0, "connections": 0, "other": 0}
    assert snap["backend_restarts"] == 3
    json.dumps(snap)
