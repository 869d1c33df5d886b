"""GET /metrics on the main port: the gateway's own series and llama-server's, in the format the scraper asks for."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from gateway.metrics import negotiate, relabel_backend_metrics
from gateway.state import ADMISSION, BACKEND, METRICS, OBSERVER, STATS, UPSTREAM
from lifecycle.upstream import UpstreamError

log = logging.getLogger("gateway.scrape")
BACKEND_SCRAPE_TIMEOUT = 2.0


async def metrics(request: web.Request) -> web.Response:
    """JSON by default (the seed's field names); Prometheus text or OpenMetrics when the Accept header (or
    ?format=prometheus|openmetrics) asks, with llama-server's own llamacpp:* series on the same scrape."""
    app = request.app
    backend, metrics = app[BACKEND], app[METRICS]
    app[OBSERVER].flush()  # every request answered so far is in what this scrape shows
    accept = request.headers.get("Accept")
    fmt = negotiate(accept, request.query.get("format"))
    if fmt == "json":
        data = app[STATS].snapshot()
        data["queue_depth"] = app[ADMISSION].depth
        data["backend_ready"] = int(backend.ready)
        data["backend_restarts"] = backend.restarts
        return web.json_response(metrics.json_snapshot(data))
    # Both gauges are read off the admission gate at scrape time rather than kept up to date per request.
    metrics.set_queue_depth(app[ADMISSION].depth)
    metrics.set_in_flight(app[ADMISSION].active)
    backend_text = await _backend_metrics(request) if backend.ready else ""
    body, content_type = await asyncio.to_thread(metrics.render, accept, backend_text, fmt == "openmetrics")
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _backend_metrics(request: web.Request) -> str:
    try:
        reply = await request.app[UPSTREAM].request("GET", "/metrics", timeout=BACKEND_SCRAPE_TIMEOUT)
    except UpstreamError as exc:
        log.warning("llama-server /metrics failed: %s", exc)
        return ""
    if reply.status != 200:
        return ""
    return relabel_backend_metrics(reply.body.decode("utf-8", "replace"))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
