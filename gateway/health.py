"""/ping, /health and /metrics on the main port, and the bare health server on PORT_HEALTH."""

from __future__ import annotations

from aiohttp import web

from gateway.appkeys import ADMISSION, BACKEND, DRAIN, SETTINGS, STATS
from gateway.stats import Drain


async def ping(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def health(request: web.Request) -> web.Response:
    """200 only when the backend is ready and we are not shutting down, 503 otherwise (the seed said 200 while the
    model was loading)."""
    backend = request.app[BACKEND]
    admission = request.app[ADMISSION]
    settings = request.app[SETTINGS]
    draining = request.app[DRAIN].draining
    ok = backend.ready and not draining
    body: dict[str, object] = {
        "status": "ok" if ok else ("draining" if draining else "unavailable"),
        "backend": backend.state.value,
        "model": backend.model_id,
        "slots": settings.parallel,
        "queue": {"active": admission.active, "depth": admission.depth, "capacity": admission.capacity,
                  "max_size": settings.max_queue_size},
        "restarts": backend.restarts,
    }
    if backend.last_error and not backend.ready:
        body["error"] = backend.last_error
        body["log_tail"] = backend.last_log_lines[-10:]
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    data = request.app[STATS].snapshot()
    data["queue_depth"] = request.app[ADMISSION].depth
    data["backend_ready"] = int(backend.ready)
    data["backend_restarts"] = backend.restarts
    return web.json_response(data)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", ping)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)


HEALTH_DRAIN = web.AppKey("drain", Drain)


async def _alive(request: web.Request) -> web.Response:
    if request.app[HEALTH_DRAIN].draining:
        return web.Response(status=503, text="draining")
    return web.Response(text="OK")


def create_health_app(drain: Drain) -> web.Application:
    """PORT_HEALTH: 200 to GET and HEAD on any path, never touching the backend, up before the model loads;
    503 from the moment a shutdown starts, so the platform stops sending traffic."""
    app = web.Application()
    app[HEALTH_DRAIN] = drain
    app.router.add_get("/{tail:.*}", _alive)
    return app
