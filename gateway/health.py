"""/ping, /health and /metrics on the main port, and the bare health server on PORT_HEALTH."""

from __future__ import annotations

from aiohttp import web

from gateway.appkeys import BACKEND, SETTINGS, STATS


async def ping(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def health(request: web.Request) -> web.Response:
    """200 only when the backend is ready, 503 otherwise (the seed said 200 while the model was loading)."""
    backend = request.app[BACKEND]
    stats = request.app[STATS]
    settings = request.app[SETTINGS]
    body = {
        "status": "ok" if backend.ready else "unavailable",
        "backend": backend.state.value,
        "model": backend.model_id,
        "slots": settings.parallel,
        "queue": {"active": stats.requests_active, "depth": stats.queue_depth},
    }
    if backend.last_error and not backend.ready:
        body["error"] = backend.last_error
    return web.json_response(body, status=200 if backend.ready else 503)


async def metrics(request: web.Request) -> web.Response:
    backend = request.app[BACKEND]
    data = request.app[STATS].snapshot()
    data["backend_ready"] = int(backend.ready)
    return web.json_response(data)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ping", ping)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)


async def _alive(_request: web.Request) -> web.Response:
    return web.Response(text="OK")


def create_health_app() -> web.Application:
    """PORT_HEALTH: 200 to GET and HEAD on any path, never touching the backend, up before the model loads."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", _alive)
    return app
