"""GET /metrics on the main port: the gateway's own series and llama-server's, in the format the scraper asks for."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

from aiohttp import web

from gateway.health import model_states
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
    if backend.models is not None and backend.router is not None:
        states = await model_states(backend, app[ADMISSION])
        metrics.set_model_states(states)
        loaded = [model for model, state in states.items() if state["status"] == "loaded"]
        backend_text = await _router_metrics(request, loaded) if backend.ready else ""
    else:
        backend_text = await _backend_metrics(request) if backend.ready else ""
    body, content_type = await asyncio.to_thread(metrics.render, accept, backend_text, fmt == "openmetrics")
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _backend_metrics(request: web.Request, model: str | None = None, headers: bool = True) -> str:
    # a model's own llama-server, through the router; autoload=false: a scrape never loads a model
    path = "/metrics" if model is None else f"/metrics?model={quote(model, safe='')}&autoload=false"
    try:
        reply = await request.app[UPSTREAM].request("GET", path, timeout=BACKEND_SCRAPE_TIMEOUT)
    except UpstreamError as exc:
        log.warning("llama-server %s failed: %s", path, exc)
        return ""
    if reply.status != 200:
        return ""
    return relabel_backend_metrics(reply.body.decode("utf-8", "replace"), model, headers)


async def _router_metrics(request: web.Request, loaded: list[str]) -> str:
    """Several models: each loaded model's llamacpp:* series, labelled with its id."""
    texts = await asyncio.gather(*(_backend_metrics(request, model, i == 0) for i, model in enumerate(loaded)))
    return "".join(texts)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
