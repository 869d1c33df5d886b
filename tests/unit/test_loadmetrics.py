"""gateway.loadmetrics: the load balancers' gauges, on /slots answers recorded from the pinned llama-server.

The fixtures are real: SmolLM2-135M with -c 4096 --parallel 4, idle at start (`boot`), while a chat stream of a
38-token prompt had produced 41 tokens (`busy`), and after it ended (`idle`, 38 + 200 - 1 tokens kept); `unified`
with --kv-unified (every slot's n_ctx is the whole buffer, 4096), `split` with --no-kv-unified (1024 each).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.loadmetrics import (
    ModelLoad,
    SlotLoad,
    families,
    kv_unified,
    model_path,
    parse_slots,
    read_slots,
    requests_deferred,
    slot_load,
    utilization,
)
from gateway.metrics import Metrics
from lifecycle.upstream import Reply, UpstreamTimeout

DATA = Path(__file__).parent / "data"


def fixture(name: str) -> list[Any]:
    slots = parse_slots((DATA / f"slots_{name}.json").read_bytes())
    assert slots is not None
    return slots


def test_the_recorded_answers_have_the_fields_the_arithmetic_reads() -> None:
    for name in ("unified_boot", "unified_busy", "unified_idle", "split_busy", "split_idle"):
        slots = fixture(name)
        assert len(slots) == 4
        for slot in slots:
            assert isinstance(slot["n_ctx"], int) and isinstance(slot["is_processing"], bool)
    busy = fixture("unified_busy")[3]
    # the slot's token list is the prompt plus what was generated so far
    assert busy["n_prompt_tokens"] == busy["n_prompt_tokens_processed"] + busy["next_token"][0]["n_decoded"]


def test_idle_at_start_holds_nothing() -> None:
    load = slot_load(fixture("unified_boot"), unified=True)
    assert load == SlotLoad(slots_total=4, running=0, tokens_held=0, tokens_cached_idle=0, n_ctx=4096)
    assert load.kv_utilization == 0.0


def test_a_unified_buffer_is_one_slots_n_ctx() -> None:
    load = slot_load(fixture("unified_busy"), unified=True)
    assert (load.slots_total, load.running, load.tokens_held, load.n_ctx) == (4, 1, 79, 4096)
    assert load.kv_utilization == pytest.approx(79 / 4096)


def test_split_buffers_add_up() -> None:
    load = slot_load(fixture("split_busy"), unified=False)
    assert (load.running, load.tokens_held, load.n_ctx) == (1, 71, 4 * 1024)
    assert load.kv_utilization == pytest.approx(71 / 4096)
    # the same answer read as unified would take one slot's share for the whole buffer
    assert slot_load(fixture("split_busy"), unified=True).kv_utilization == pytest.approx(71 / 1024)


@pytest.mark.parametrize("name", ["unified_idle", "split_idle"])
def test_an_idle_slots_kept_cache_is_not_held(name: str) -> None:
    load = slot_load(fixture(name), unified=name.startswith("unified"))
    assert (load.running, load.tokens_held, load.tokens_cached_idle) == (0, 0, 237)
    assert load.kv_utilization == 0.0


def test_clamped_to_one_and_absent_without_context() -> None:
    slots = [{"id": i, "n_ctx": 100, "is_processing": True, "n_prompt_tokens": 80} for i in range(2)]
    assert slot_load(slots, unified=True).kv_utilization == 1.0  # 160 / 100
    assert slot_load(slots, unified=False).kv_utilization == pytest.approx(0.8)
    assert utilization(-5, 10) == 0.0
    assert slot_load([], unified=True).kv_utilization is None
    assert utilization(3, 0) is None


def test_odd_fields_count_as_nothing() -> None:
    slots = [{"n_ctx": "4096", "is_processing": "yes", "n_prompt_tokens": True},
             {"n_ctx": 512, "is_processing": True, "n_prompt_tokens": -3}]
    assert slot_load(slots, unified=False) == SlotLoad(2, 1, 0, 0, 512)
    assert parse_slots(b'{"error": {"code": 501}}') is None
    assert parse_slots(b"not json") is None
    assert parse_slots(b'[1, {"id": 0}]') == [{"id": 0}]


def test_requests_deferred_from_llama_servers_metrics_text() -> None:
    text = ("# HELP llamacpp:requests_deferred Number of requests deferred\n"
            "# TYPE llamacpp:requests_deferred gauge\nllamacpp:requests_deferred 3\n")
    assert requests_deferred(text) == 3
    assert requests_deferred("llamacpp:requests_processing 1\n") is None
    assert requests_deferred("") is None


def test_kv_unified_the_command_line_wins_then_the_preset() -> None:
    assert kv_unified(()) is True
    assert kv_unified(("--no-kv-unified",)) is False
    assert kv_unified(("-no-kvu", "-kvu")) is True
    assert kv_unified((), [("kv-unified", "true"), ("kv-unified", "false")]) is False
    assert kv_unified((), [("no-kv-unified", "true")]) is False
    assert kv_unified(("--kv-unified",), [("kv-unified", "false")]) is True


class FakeUpstream:
    def __init__(self, answer: Reply | Exception) -> None:
        self.answer = answer
        self.paths: list[str] = []

    async def request(self, method: str, path: str, *, timeout: float | None = None, **_: object) -> Reply:
        assert method == "GET" and timeout == 2.0
        self.paths.append(path)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_read_slots_none_on_failure_and_the_routers_path() -> None:
    body = (DATA / "slots_unified_busy.json").read_bytes()

    async def run() -> None:
        ok = FakeUpstream(Reply(200, "application/json", body))
        assert await read_slots(ok, None, 2.0) == json.loads(body)  # type: ignore[arg-type]
        assert await read_slots(ok, "my model", 2.0) is not None  # type: ignore[arg-type]
        assert ok.paths == ["/slots", "/slots?model=my%20model&autoload=false"]
        for answer in (UpstreamTimeout("2 s"), Reply(501, "application/json", b'{"error": {}}'),
                       Reply(200, "text/html", b"<html>")):
            assert await read_slots(FakeUpstream(answer), None, 2.0) is None  # type: ignore[arg-type]

    asyncio.run(run())
    assert model_path("/slots", None) == "/slots"
    assert model_path("/metrics", "a/b") == "/metrics?model=a%2Fb&autoload=false"


def scrape(loads: dict[str, ModelLoad]) -> dict[str, Any]:
    metrics = Metrics(CollectorRegistry())
    metrics.set_load(loads)
    body, _ = metrics.render("text/plain")
    return {family.name: family for family in text_string_to_metric_families(body.decode())}


def test_prometheus_rendering_one_gauge_sample_per_model_absent_when_slots_failed() -> None:
    busy = slot_load(fixture("unified_busy"), unified=True)
    found = scrape({"smol": ModelLoad(queued=2, slots=busy), "gone": ModelLoad(queued=1, slots=None)})
    names = ("gateway_queued_requests", "gateway_kv_cache_utilization", "gateway_running_requests",
             "gateway_slots_total")
    for name in names:
        assert found[name].type == "gauge"
        assert all(set(s.labels) == {"model"} for s in found[name].samples)

    def sample(name: str, model: str) -> float | None:
        values = [s.value for s in found[name].samples if s.labels["model"] == model]
        return values[0] if values else None

    assert sample("gateway_queued_requests", "smol") == 2 and sample("gateway_queued_requests", "gone") == 1
    assert sample("gateway_kv_cache_utilization", "smol") == pytest.approx(79 / 4096)
    assert sample("gateway_running_requests", "smol") == 1 and sample("gateway_slots_total", "smol") == 4
    for name in names[1:]:
        assert sample(name, "gone") is None  # absent, not 0


def test_a_later_scrape_leaves_no_stale_sample() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.set_load({"a": ModelLoad(0, slot_load(fixture("unified_boot"), True))})
    metrics.set_load({"b": ModelLoad(0, None)})
    body = metrics.render("text/plain")[0].decode()
    assert 'model="a"' not in body and 'gateway_queued_requests{model="b"} 0.0' in body
    assert "gateway_kv_cache_utilization" in body  # HELP and TYPE stay, with no sample


def test_openmetrics_rendering_keeps_the_names() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.set_load({"smol": ModelLoad(0, slot_load(fixture("unified_busy"), True))})
    body = metrics.render("application/openmetrics-text")[0].decode()
    assert "# TYPE gateway_kv_cache_utilization gauge" in body
    assert 'gateway_slots_total{model="smol"} 4.0' in body


def test_json_form() -> None:
    load = ModelLoad(3, slot_load(fixture("unified_busy"), True)).to_json()
    assert load == {"queued_requests": 3, "running_requests": 1, "slots_total": 4,
                    "kv_cache_utilization": pytest.approx(79 / 4096), "kv_tokens_held": 79,
                    "kv_tokens_cached_idle": 0, "n_ctx": 4096}
    assert ModelLoad(0, None).to_json() == {"queued_requests": 0, "running_requests": None, "slots_total": None,
                                            "kv_cache_utilization": None, "kv_tokens_held": None,
                                            "kv_tokens_cached_idle": None, "n_ctx": None}
    assert families({})[0].name == "gateway_queued_requests"
