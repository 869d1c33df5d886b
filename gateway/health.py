"""/ping, /health and /metrics on the main port, and the bare health server on PORT_HEALTH."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.appkeys import ADMISSION, BACKEND, DRAIN, KEYS, METRICS, OBSERVER, SETTINGS, STATS, UPSTREAM
from gateway.auth import caller_key
from gateway.metrics import negotiate, relabel_backend_metrics
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import RequestIds
from gateway.stats import Drain
from lifecycle.upstream import UpstreamError

log = logging.getLogger("gateway.health")
BACKEND_SCRAPE_TIMEOUT = 2.0


async def ping(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def health(request: web.Request) -> web.Response:
    """200 only when the backend is ready and we are not shutting down, 503 otherwise (the seed said 200 while the
    model was loading). "saturated" (still 200: requests queue) when every backend slot is held."""
    backend = request.app[BACKEND]
    admission = request.app[ADMISSION]
    settings = request.app[SETTINGS]
    draining = request.app[DRAIN].draining
    ok = backend.ready and not draining
    status = "draining" if draining else "unavailable"
    if ok:
        status = "saturated" if admission.saturated else "ok"
    body: dict[str, object] = {
        "status": status,
        "backend": backend.state.value,
        "model": backend.model_id,
        "slots": settings.parallel,
        "queue": {"active": admission.active, "depth": admission.depth, "capacity": admission.capacity,
                  "max_size": settings.max_queue_size},
        "restarts": backend.restarts,
        # what llama-server was asked and chose for GPU layers and context (lifecycle.offload.summary)
        "offload": backend.offload,
    }
    if backend.last_error and not backend.ready:
        body["error"] = backend.last_error
        if may_see_backend_log(request):  # llama-server's log can quote what other callers sent
            body["log_tail"] = backend.last_log_lines[-10:]
    return web.json_response(body, status=200 if ok else 503)


def may_see_backend_log(request: web.Request) -> bool:
    """Callers on this machine, and callers with a valid API key when AUTH_ENABLED."""
    try:
        if request.remote is not None and ipaddress.ip_address(request.remote).is_loopback:
            return True
    except ValueError:
        pass
    return request.app[SETTINGS].auth_enabled and caller_key(request.app[KEYS].ring,
                                                             request.headers.get("Authorization", "")) is not None


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
    app.router.add_get("/ping", ping)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)


HEALTH_DRAIN = web.AppKey("drain", Drain)
HEALTH_IDS = web.AppKey("request_ids", RequestIds)


async def _alive(request: web.Request) -> web.Response:
    if request.app[HEALTH_DRAIN].draining:
        return web.Response(status=503, text="draining")
    return web.Response(text="OK")


@web.middleware
async def _request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every answer of the health port carries an X-Request-ID too (the client's when safe, else a new one)."""
    rid = request.app[HEALTH_IDS](request.headers.get(REQUEST_ID_HEADER))
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 405 to a POST, ...
        exc.headers[REQUEST_ID_HEADER] = rid
        raise
    response.headers[REQUEST_ID_HEADER] = rid
    return response


def create_health_app(drain: Drain) -> web.Application:
    """PORT_HEALTH: 200 to GET and HEAD on any path, never touching the backend, up before the model loads;
    503 from the moment a shutdown starts, so the platform stops sending traffic."""
    app = web.Application(middlewares=[_request_id])
    app[HEALTH_DRAIN] = drain
    app[HEALTH_IDS] = RequestIds()
    app.router.add_get("/{tail:.*}", _alive)
    return app
