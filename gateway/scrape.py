"""GET /metrics on the main port: the gateway's own series and llama-server's, in the format the scraper asks for."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from gateway.health import model_states
from gateway.loadmetrics import ModelLoad, backend_get, kv_unified, read_slots, requests_deferred, slot_load
from gateway.metrics import negotiate, relabel_backend_metrics
from gateway.state import ADMISSION, BACKEND, METRICS, OBSERVER, SETTINGS, STATS, UPSTREAM

BACKEND_SCRAPE_TIMEOUT = 2.0


async def metrics(request: web.Request) -> web.Response:
    """JSON by default (the seed's field names); Prometheus text or OpenMetrics when the Accept header (or
    ?format=prometheus|openmetrics) asks, with llama-server's own llamacpp:* series on the same scrape, and each
    model's load (gateway.loadmetrics) in both."""
    app = request.app
    backend, metrics, admission = app[BACKEND], app[METRICS], app[ADMISSION]
    app[OBSERVER].flush()  # every request answered so far is in what this scrape shows
    accept = request.headers.get("Accept")
    fmt = negotiate(accept, request.query.get("format"))
    states = None
    if backend.models is not None and backend.router is not None:
        states = await model_states(backend, admission)
        # (series label, the router's model): each loaded model's llama-server, through the router
        targets: list[tuple[str, str | None]] = [(model, model) for model, state in states.items()
                                                 if state["status"] == "loaded"]
    else:
        targets = [] if backend.model_id is None else [(backend.model_id, None)]
    texts, slots = await _read_backends(request, [model for _, model in targets]) if backend.ready \
        else ([""] * len(targets), [None] * len(targets))
    loads = {label: _load(request, model, text, found)
             for (label, model), text, found in zip(targets, texts, slots, strict=True)}
    if fmt == "json":
        data = app[STATS].snapshot()
        data["queue_depth"] = admission.depth
        data["backend_ready"] = int(backend.ready)
        data["backend_restarts"] = backend.restarts
        data["load"] = {label: load.to_json() for label, load in loads.items()}
        return web.json_response(metrics.json_snapshot(data))
    # The gauges are read off the admission gate and the backend at scrape time rather than kept up per request.
    metrics.set_queue_depth(admission.depth)
    metrics.set_in_flight(admission.active)
    if states is not None:
        metrics.set_model_states(states)
    metrics.set_load(loads)
    backend_text, headers = [], True
    for (_, model), text in zip(targets, texts, strict=True):
        relabelled = relabel_backend_metrics(text, model, headers)
        headers = headers and not relabelled  # HELP and TYPE once, with the first model that answered
        backend_text.append(relabelled)
    body, content_type = await asyncio.to_thread(metrics.render, accept, "".join(backend_text),
                                                 fmt == "openmetrics")
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _read_backends(
    request: web.Request, models: list[str | None]
) -> tuple[list[str], list[list[Mapping[str, Any]] | None]]:
    """Each target's /metrics text and /slots, all at once (each bounded by BACKEND_SCRAPE_TIMEOUT)."""
    upstream = request.app[UPSTREAM]
    texts, slots = await asyncio.gather(
        asyncio.gather(*(_backend_metrics(request, model) for model in models)),
        asyncio.gather(*(read_slots(upstream, model, BACKEND_SCRAPE_TIMEOUT) for model in models)))
    return list(texts), list(slots)


def _load(request: web.Request, model: str | None, text: str,
          slots: list[Mapping[str, Any]] | None) -> ModelLoad:
    """One model's load: its admission queue plus llama-server's deferred requests, and its slots."""
    app = request.app
    admissions, settings, backend = app[ADMISSION], app[SETTINGS], app[BACKEND]
    queued = (admissions.depth if model is None else admissions.of(model).depth) + (requests_deferred(text) or 0)
    if slots is None:
        return ModelLoad(queued, None)
    options: tuple[tuple[str, str], ...] = ()
    served = None if model is None or backend.models is None else backend.models.get(model)
    if served is not None and backend.models is not None:
        options = (*backend.models.global_options, *served.options)
    return ModelLoad(queued, slot_load(slots, kv_unified(settings.extra_args, options)))


async def _backend_metrics(request: web.Request, model: str | None = None) -> str:
    """llama-server's /metrics text as it answered ("" when it failed); a model's own, through the router."""
    body = await backend_get(request.app[UPSTREAM], "/metrics", model, BACKEND_SCRAPE_TIMEOUT)
    return "" if body is None else body.decode("utf-8", "replace")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics)
