"""The gateway application: middlewares, routes, and the upstream client's lifetime."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway import health, proxy
from gateway.appkeys import BACKEND, KEYS, SETTINGS, STATS, UPSTREAM
from gateway.auth import KeyRing, bearer_token, load_keys
from gateway.errors import error_response
from gateway.stats import Stats
from lifecycle.settings import Settings
from lifecycle.supervisor import Supervisor
from lifecycle.upstream import Upstream

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PUBLIC_PATHS = frozenset({"/ping", "/health", "/metrics"})


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's own HTTP errors (404, 405, 413, ...) into OpenAI-shaped JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no route {request.method} {request.path}"
        elif exc.status == 413:
            message = f"request body is larger than {request.app[SETTINGS].max_request_body_size} bytes"
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        return error_response(exc.status, message, headers=headers)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if not settings.auth_enabled or request.path in PUBLIC_PATHS or not request.path.startswith("/v1/"):
        return await handler(request)
    keys = request.app[KEYS]
    token = bearer_token(request.headers.get("Authorization", ""))
    if not keys:
        return error_response(401, "authentication is enabled but no API keys are configured", "no_api_keys")
    if not token:
        return error_response(401, "missing API key: send Authorization: Bearer <key>", "missing_api_key")
    if keys.match(token) is None:
        return error_response(401, "invalid API key", "invalid_api_key")
    return await handler(request)


@web.middleware
async def stats_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count the API requests (not probes or scrapes) for /metrics and /health."""
    if not request.path.startswith("/v1/"):
        return await handler(request)
    stats = request.app[STATS]
    stats.begin()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    finally:
        stats.end(status)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    backend = app[BACKEND]
    upstream = Upstream(backend.base_url, backend.api_key)
    await upstream.start()
    app[UPSTREAM] = upstream
    yield
    await upstream.close()


def create_app(settings: Settings, backend: Supervisor, keys: KeyRing | None = None) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_request_body_size,
        middlewares=[stats_middleware, errors_middleware, auth_middleware],
    )
    app[SETTINGS] = settings
    app[BACKEND] = backend
    app[STATS] = Stats()
    if keys is None:
        keys = load_keys(settings.keys_file) if settings.auth_enabled else KeyRing()
    app[KEYS] = keys
    if settings.auth_enabled and not keys:
        log.warning(
            "AUTH_ENABLED=true but no API keys were loaded from %s: every /v1/* request gets 401. "
            "Add a line 'key_id:sk-...' (16+ characters) to that file, or set AUTH_ENABLED=false for local tests.",
            settings.keys_file,
        )
    app.cleanup_ctx.append(_upstream_ctx)
    health.add_routes(app)
    proxy.add_routes(app)
    return app
