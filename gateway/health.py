"""/ping and /health on the main port, and the bare health server on PORT_HEALTH (/metrics: gateway.scrape)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.admission import Admissions
from gateway.auth import caller_key, credential
from gateway.drain import Drain
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import RequestIds
from gateway.state import ADMISSION, BACKEND, DRAIN, KEYS, SETTINGS, SHARED
from lifecycle.backend import Backend
from lifecycle.upstream import UpstreamError

log = logging.getLogger("gateway.health")


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
    shared = request.app.get(SHARED)
    if shared is not None:  # REDIS_URL: whether the limits are shared right now (still 200 when not)
        body["shared_limits"] = {"redis": "up" if shared.up else "unreachable",
                                 "limits": "shared" if shared.up else "this replica only",
                                 "fallbacks": shared.fallbacks}
    if backend.models is not None and backend.router is not None:
        body["models"] = await model_states(backend, admission)
    if backend.last_error and not backend.ready:
        body["error"] = backend.last_error
        if may_see_backend_log(request):  # llama-server's log can quote what other callers sent
            body["log_tail"] = backend.last_log_lines[-10:]
    return web.json_response(body, status=200 if ok else 503)


async def model_states(backend: Backend, admission: Admissions) -> dict[str, dict[str, object]]:
    """Several models: each one's router status and its own slots and queue."""
    router, models = backend.router, backend.models
    assert router is not None and models is not None
    if backend.ready:
        with contextlib.suppress(UpstreamError):  # else the statuses last seen
            await router.status(models.default)  # fetched again when older than STATUS_TTL
    states: dict[str, dict[str, object]] = {}
    for model in models.models:
        gate = admission.of(model.id)
        status = router.statuses.get(model.id)
        states[model.id] = {"status": status.value if status else "unloaded", "active": gate.active,
                            "depth": gate.depth}
        if status is not None and status.failed:
            states[model.id]["failed"] = True
    return states


def may_see_backend_log(request: web.Request) -> bool:
    """Callers on this machine, and callers with a valid API key when AUTH_ENABLED."""
    try:
        if request.remote is not None and ipaddress.ip_address(request.remote).is_loopback:
            return True
    except ValueError:
        pass
    return request.app[SETTINGS].auth_enabled and caller_key(request.app[KEYS].ring,
                                                             credential(request.headers.get("Authorization", ""),
                                                                        request.headers.get("x-api-key", ""))) \
        is not None


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", ping)
    app.router.add_get("/health", health)


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


HEALTH_READY = web.AppKey("ready", Callable[[], bool])


async def _ping(request: web.Request) -> web.Response:
    """RunPod load-balancing endpoints' protocol: GET /ping on PORT_HEALTH is 204 while the worker initializes
    (the model loads), 200 once it can answer, anything else unhealthy (503 while draining)."""
    if not request.app[HEALTH_DRAIN].draining and not request.app[HEALTH_READY]():
        return web.Response(status=204)
    return await _alive(request)


def create_health_app(drain: Drain, ready: Callable[[], bool] = lambda: True) -> web.Application:
    """PORT_HEALTH: 200 to GET and HEAD on any path, never touching the backend, up before the model loads;
    503 from the moment a shutdown starts, so the platform stops sending traffic. `/ping` also says whether the
    model is loaded (`ready`): 204 until it is (RunPod's load balancer sends a 204 worker no traffic)."""
    app = web.Application(middlewares=[_request_id])
    app[HEALTH_DRAIN] = drain
    app[HEALTH_IDS] = RequestIds()
    app[HEALTH_READY] = ready
    app.router.add_get("/ping", _ping)
    app.router.add_get("/{tail:.*}", _alive)
    return app
