"""Batched per-request bookkeeping: nothing lost, nothing late past a scrape, one bad item costs only itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway import observe
from gateway.accesslog import AccessLog
from gateway.metrics import Metrics
from gateway.observe import JSON, SSE, Answer, Observer

BODY = json.dumps({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
                   "timings": {"predicted_ms": 70.0}}).encode()
SSE_TAIL = (b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4},'
            b'"timings":{"predicted_n":4,"predicted_ms":40.0}}\n\ndata: [DONE]\n\n')


def record(observer: Observer, answer: Answer | None = None, status: int = 200, rejected: str | None = None) -> None:
    observer.record("/v1/chat/completions", "POST", status, "team", 0.012, "rid-1", rejected, None, answer)


def requests_total(metrics: Metrics) -> float:
    return sum(metrics.requests.values())


def test_nothing_is_counted_before_a_flush_and_everything_after() -> None:
    async def run() -> None:
        metrics = Metrics(CollectorRegistry())
        observer = Observer(metrics, None, lambda: "smol")
        record(observer, Answer(JSON, BODY))
        record(observer, Answer(SSE, SSE_TAIL))
        record(observer, status=429, rejected="rate")
        assert requests_total(metrics) == 0  # still pending
        observer.flush()
        assert requests_total(metrics) == 3
        assert (metrics.prompt_tokens, metrics.completion_tokens) == (8, 11)
        assert metrics.rejections["rate"] == 1
        assert metrics.prompt[("team", "smol")] == 8

    asyncio.run(run())


def test_a_full_batch_and_the_timer_flush_by_themselves(tmp_path: Path) -> None:
    async def run() -> None:
        metrics = Metrics(CollectorRegistry())
        access_log = AccessLog(tmp_path)
        observer = Observer(metrics, access_log, lambda: None)
        for _ in range(observe.BATCH):
            record(observer)
        assert requests_total(metrics) == observe.BATCH  # the batch filled up: flushed at once
        record(observer)
        await asyncio.sleep(observe.FLUSH_INTERVAL * 3)
        assert requests_total(metrics) == observe.BATCH + 1  # the timer flushed the rest
        await asyncio.to_thread(access_log.close)
        assert len((tmp_path / "access.log").read_text().splitlines()) == observe.BATCH + 1

    asyncio.run(run())


def test_one_bad_item_costs_only_itself(caplog) -> None:  # type: ignore[no-untyped-def]
    async def run() -> None:
        metrics = Metrics(CollectorRegistry())
        observer = Observer(metrics, None, lambda: None)
        record(observer)
        observer.record("/v1/models", "GET", 200, ["unhashable"], 0.1, "rid-bad", None, None, None)  # type: ignore[arg-type]
        record(observer)
        observer.flush()
        assert requests_total(metrics) == 2
        assert "cannot account for request rid-bad" in caplog.text

    asyncio.run(run())
