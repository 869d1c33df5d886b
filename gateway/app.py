"""The gateway application: middlewares, routes, and the lifetime of what the app owns.

One middleware runs the steps in data-flow order: request limits -> CORS preflight -> auth and rate limits -> route,
with aiohttp's own HTTP errors turned into OpenAI-shaped JSON and API requests counted. Request-id, CORS and
rate-limit headers are added to every answer, streams included, by gateway.decorate just before the headers go out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway import admin, health, proxy, scrape
from gateway.accesslog import AccessLog
from gateway.admission import Admissions
from gateway.audit import FAILED, OK, SIGNAL, WATCHER, AuditLog
from gateway.auth import Admitted, KeyRing, KeyStore, credential, judge, verdict
from gateway.connections import Connections
from gateway.cors import Cors
from gateway.decorate import decorate
from gateway.drain import Drain
from gateway.errors import CLIENT_CLOSED, INTERNAL_ERROR, error_response, shaped
from gateway.guard import Guard
from gateway.keyfile import METRICS as METRICS_GROUP
from gateway.ledger import Ledger
from gateway.limits import MAX_REQUEST_LINE, body_too_large, header_problem
from gateway.metrics import Metrics
from gateway.observe import Observer
from gateway.pipeline import Exchange, Pipeline
from gateway.requestid import HEADER as REQUEST_ID_HEADER
from gateway.requestid import RequestIds
from gateway.routes import ALWAYS_PUBLIC, PROBES
from gateway.shared import Shared, revocation_tag
from gateway.state import (
    ACCESS_LOG,
    ADMISSION,
    AUDIT,
    BACKEND,
    CONNECTIONS,
    CORS,
    DRAIN,
    EXCHANGE,
    GUARD,
    KEYS,
    LEDGER,
    LIMITS,
    METRICS,
    OBSERVER,
    PIPELINE,
    REQUEST_IDS,
    SETTINGS,
    SHARED,
    STATS,
    UPSTREAM,
)
from gateway.stats import Stats
from lifecycle.backend import Backend
from lifecycle.request_rules import Limits
from lifecycle.routes import shape_of
from lifecycle.settings import Settings

log = logging.getLogger("gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LEDGER_CLOSE_TIMEOUT = 10.0  # seconds the ledger's last write may wait for the database (BUSY_TIMEOUT and more)


def check_limits(request: web.Request, settings: Settings) -> web.Response | None:
    """Request line, header and declared body limits, answered before the body is read."""
    refused = _limits(request, settings)
    if refused is not None:
        request[EXCHANGE].rejected = "size"
    return refused


def _limits(request: web.Request, settings: Settings) -> web.Response | None:
    if len(request.method) + len(request.raw_path) + 10 > MAX_REQUEST_LINE:
        return error_response(414, f"the request line is longer than {MAX_REQUEST_LINE} bytes")
    problem = header_problem(request.raw_headers, settings.max_headers, settings.max_header_line_size)
    if problem is not None:
        return error_response(431, problem)
    length = request.content_length
    if length is not None and body_too_large(length, settings.max_request_body_size):
        return error_response(413, f"request body is larger than {settings.max_request_body_size} bytes "
                                   "(MAX_REQUEST_BODY_SIZE)")
    return None


def http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own HTTP errors (404, 405, 408, 413, ...) as OpenAI-shaped JSON."""
    message = exc.reason
    if exc.status == 404:
        message = f"no route {request.method} {request.path}"
    elif exc.status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    elif exc.status == 413:
        message = f"request body is larger than {request.app[SETTINGS].max_request_body_size} bytes"
        request[EXCHANGE].rejected = "size"
    headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    response = error_response(exc.status, message, headers=headers)
    if exc.status in (408, 413):
        response.force_close()  # the rest of the body is still on the wire: this connection is done
    return response


def _public(request: web.Request, settings: Settings) -> bool:
    path = request.path
    if path in ALWAYS_PUBLIC:
        return True
    return path == "/metrics" and not settings.metrics_auth_enabled


async def authorize(request: web.Request, settings: Settings) -> web.Response | None:
    """Who is calling and whether their rate limit allows it (gateway.auth.verdict, the rule the fast lane uses
    too; with REDIS_URL through gateway.auth.judge, on the shared windows); None means go on, with the key id and
    the rate decision on the request's Exchange."""
    ex = request[EXCHANGE]
    if settings.auth_enabled and _public(request, settings):
        return None
    app = request.app
    presented = credential(request.headers.get("Authorization", ""), request.headers.get("x-api-key", ""))
    shared = app.get(SHARED)
    if shared is None or not settings.auth_enabled:
        result = verdict(app[KEYS].ring, app[GUARD], settings, presented, request.remote or "unknown", request.path)
    else:
        result = await judge(app[KEYS].ring, app[GUARD], shared, settings, presented, request.remote or "unknown",
                             request.path)
    if isinstance(result, Admitted):
        ex.key_id, ex.decision, ex.caller = result.key_id, result.decision, result
        return None
    ex.rejected = result.reason
    if result.key_id is not None:
        ex.key_id = result.key_id  # a key that is known but refused: its limits, scopes or expiry
    if result.reason == "rate":
        ex.decision = result.decision
        log.info("rate limited: key_id=%s request_id=%s", result.key_id, ex.request_id)
    elif result.code == "admin_key_required":
        log.warning("admin action %s refused: key_id=%s is not an admin key (request_id=%s)", request.path,
                    result.key_id, ex.request_id)
    elif result.reason in ("budget", "scope"):
        log.info("refused (%s): key_id=%s request_id=%s", result.code, result.key_id, ex.request_id)
    elif result.code == "expired_api_key":
        log.info("expired key used: key_id=%s request_id=%s", result.key_id, ex.request_id)
    return error_response(result.status, result.message, result.code, headers=result.headers)


@web.middleware
async def gate_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One middleware, in data-flow order: the request's Exchange -> limits -> drain -> CORS preflight -> auth and
    rate limit -> route; then the request is recorded (gateway.pipeline.Pipeline.record, as in the fast lane).

    (One layer rather than several: each layer is a coroutine frame on every request of the hot path.)
    """
    app = request.app
    settings = app[SETTINGS]
    ex = request[EXCHANGE] = Exchange(time.monotonic(), request.method, request.path,
                                      app[REQUEST_IDS](request.headers.get(REQUEST_ID_HEADER)))
    refused = check_limits(request, settings)
    if refused is None and app[DRAIN].draining and request.path not in PROBES:
        refused = error_response(503, "the server is shutting down; retry on another instance", "shutting_down",
                                 headers={"Retry-After": "1", "Connection": "close"})
    if refused is None and Cors.is_preflight(request):
        refused = app[CORS].preflight(request)
    if refused is None:
        refused = await authorize(request, settings)
        if refused is not None and refused.status == 403:
            await admin.audit_refusal(request)  # an admin action refused for its key: audited
    pipeline = app[PIPELINE]
    pipeline.begin(ex)
    status = 500
    try:
        if refused is not None:
            response: web.StreamResponse = refused
        else:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                response = http_error(request, exc)
            except asyncio.CancelledError:
                status = CLIENT_CLOSED  # the client left before its answer (a stream counts with its own status)
                raise
            except Exception:
                if ex.status:  # a stream already under way: aiohttp can only drop the connection
                    raise
                log.exception("unexpected error on %s %s (request_id=%s)", request.method, request.path,
                              ex.request_id)
                response = error_response(500, INTERNAL_ERROR, "internal_error")
        status = response.status
        if not response.prepared:  # streams were decorated by the proxy before their headers went out
            if status >= 400 and isinstance(response, web.Response) and isinstance(response.body, bytes):
                shape = shape_of(request.path)
                if shape != "openai":  # the gateway's own refusals in the route's error shape (errors.shaped)
                    response.body = shaped(shape, status, response.body)
            decorate(request, response)
        return response
    finally:
        # A handler cancelled after its answer started (the client left, or closed a finished stream early)
        # counts with the status it sent.
        pipeline.record(ex, ex.status or status)


async def reload_keys(request: web.Request) -> web.Response:
    """Read the keys file now. Never a 500: a file that cannot be read leaves no key (fail closed), and the answer
    says why in `warning` (without any of the file's content)."""
    store = request.app[KEYS]
    await store.reload(force=True)
    body: dict[str, object] = {"status": "reloaded", "keys": len(store.ring)}
    if store.problem is not None:
        body["warning"] = store.problem
    await audit_reload(request.app, request[EXCHANGE].key_id, request.remote)
    return web.json_response(body)


async def audit_reload(app: web.Application, who: str | None, source: str | None) -> None:
    """The audit line of a keys reload: how many keys are loaded, or why none is (never the file's content)."""
    store = app[KEYS]
    details: dict[str, object] = {"file": str(store.path), "keys": len(store.ring)}
    if store.problem is not None:
        details["problem"] = store.problem
    await app[AUDIT].record(who, "keys.reload", None, source, FAILED if store.problem else OK, details)


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    upstream = app[BACKEND].client(connect_timeout=settings.connect_timeout,
                                   stream_idle_timeout=settings.stream_idle_timeout,
                                   max_response_size=settings.max_response_size)
    app[UPSTREAM] = upstream
    yield
    await upstream.close()


async def _keys_ctx(app: web.Application) -> AsyncIterator[None]:
    """Hot reload: a file watcher (at most once a second), and SIGHUP."""
    store = app[KEYS]
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()

    async def sighup_reload() -> None:
        await store.reload(force=True)
        await audit_reload(app, SIGNAL, "SIGHUP")

    def on_sighup() -> None:
        log.info("SIGHUP: reloading the keys file")
        task = loop.create_task(sighup_reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def changed() -> Awaitable[None]:
        return audit_reload(app, WATCHER, "file watcher")

    tasks = [asyncio.create_task(store.watch(changed=changed)), asyncio.create_task(_prune(app))]
    hup = False
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        hup = True
    yield
    if hup:
        loop.remove_signal_handler(signal.SIGHUP)
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _shared_ctx(app: web.Application) -> AsyncIterator[None]:
    """REDIS_URL: reach Redis (a warning when it cannot be: limits stay per replica until it can), then keep the
    shared state in step in the background until the app closes."""
    shared = app[SHARED]
    await shared.start()
    task = asyncio.create_task(shared.run())
    log.info("limits shared through Redis (REDIS_URL): %s", "reachable" if shared.up else "NOT reachable")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await shared.close()


def _share(app: web.Application, settings: Settings, store: KeyStore, guard: Guard, metrics: Metrics) -> None:
    """With REDIS_URL: the shared windows (gateway.shared), told of every key this replica's file loses or gains
    and of every token spent; the revoked set's copy lands in Guard.revoked."""
    assert settings.redis_url is not None

    def on_revoked(tags: frozenset[str]) -> None:
        guard.revoked = tags

    shared = Shared(settings.redis_url, settings.redis_timeout, settings.auth_failure_limit,
                    settings.auth_failure_window, on_revoked)

    def on_change(old: KeyRing, new: KeyRing) -> None:
        before, after = {e.digest for e in old.entries}, {e.digest for e in new.entries}
        removed, added = before - after, after - before
        if removed or added:
            shared.keys_changed(removed, added)
            gone = {revocation_tag(d) for d in removed}
            back = {revocation_tag(d) for d in added}
            guard.revoked = (guard.revoked | gone) - back  # here at once; everywhere once sent
            log.info("keys file changed: %d key(s) revoked and %d allowed on every replica (REDIS_URL)",
                     len(removed), len(added))

    store.on_change = on_change
    guard.spent = shared.spend
    metrics.shared_source = lambda: (shared.up, shared.fallbacks)
    app[SHARED] = shared
    app.cleanup_ctx.append(_shared_ctx)


async def _prune(app: web.Application) -> None:
    while True:
        await asyncio.sleep(60)
        app[GUARD].prune()


async def _audit_ctx(app: web.Application) -> AsyncIterator[None]:
    """The audit log's writer thread, stopped (after its last line) when the app closes."""
    yield
    await asyncio.to_thread(app[AUDIT].close)


async def _access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    try:
        access_log = AccessLog(settings.log_dir, settings.log_format, settings.access_log_max_bytes,
                               settings.access_log_backups)
    except OSError as exc:
        log.warning("no access log: cannot write under %s: %s", settings.log_dir, exc)
        yield
        return
    app[ACCESS_LOG] = access_log
    yield
    await asyncio.to_thread(access_log.close)


async def _ledger_ctx(app: web.Application) -> AsyncIterator[None]:
    """The usage ledger's writer thread; its last write comes after the observer's last batch (cleanup runs in
    reverse order)."""
    ledger = Ledger(app[SETTINGS].usage_db)
    await asyncio.to_thread(ledger.open)  # the file and its schema, off the loop; a problem is logged, not fatal
    ledger.start()
    app[LEDGER] = ledger
    yield
    await asyncio.to_thread(ledger.close, LEDGER_CLOSE_TIMEOUT)


async def _observer_ctx(app: web.Application) -> AsyncIterator[None]:
    """After the access log and the ledger open and before they close, so the last batch still reaches them."""
    backend = app[BACKEND]
    # the one model's id labels every request; with several models (MODELS) each request names its own
    single = not app[SETTINGS].models
    observer = Observer(app[METRICS], app.get(ACCESS_LOG), lambda: backend.model_id if single else None,
                        app.get(LEDGER), app[GUARD].spend)
    app[OBSERVER] = observer
    yield
    observer.flush()


async def _pipeline_ctx(app: web.Application) -> AsyncIterator[None]:
    """Once the upstream client and the observer exist: the exchange pipeline both lanes use."""
    app[PIPELINE] = Pipeline(app[SETTINGS], app[BACKEND], app[UPSTREAM], app[ADMISSION], app[METRICS], app[STATS],
                             app[OBSERVER], app[GUARD])
    yield


def create_app(
    settings: Settings, backend: Backend, drain: Drain | None = None, registry: CollectorRegistry | None = None
) -> web.Application:
    app = web.Application(
        client_max_size=settings.max_request_body_size,
        middlewares=[gate_middleware],
    )
    app[SETTINGS] = settings
    app[BACKEND] = backend
    app[STATS] = Stats()
    app[DRAIN] = drain or Drain()
    app[ADMISSION] = Admissions(settings.max_concurrent_requests, settings.max_queue_size, settings.queue_timeout)
    metrics = Metrics(registry or CollectorRegistry())
    metrics.set_backend_source(lambda: (backend.up, backend.ready, backend.restarts))
    app[METRICS] = metrics
    app[REQUEST_IDS] = RequestIds()
    app[LIMITS] = Limits.from_settings(settings, backend if settings.models else None)
    app[CONNECTIONS] = Connections(settings.max_connections, app[REQUEST_IDS], lambda: metrics.reject("connections"))
    app[CORS] = Cors(settings.cors_origins)
    app[GUARD] = guard = Guard(settings)
    store = KeyStore(settings.keys_file)
    app[KEYS] = store
    if settings.redis_url and settings.auth_enabled:
        _share(app, settings, store, guard, metrics)
    elif settings.redis_url:
        log.warning("REDIS_URL is not used with AUTH_ENABLED=false: what it shares (rate limits, token budgets, "
                    "failed keys, revocations) is per key")
    app[AUDIT] = AuditLog(settings.audit_dir)
    app.cleanup_ctx.append(_audit_ctx)  # first in, last out: it outlives what writes to it
    if settings.auth_enabled:
        store.load()
        if not store.ring:
            from gateway.keys import command as keys_cli_command  # (only needed for this hint)

            log.warning(
                "AUTH_ENABLED=true but no API keys were loaded from %s: every API request gets 401. "
                "Create one with: %s (or set AUTH_ENABLED=false for local tests)",
                settings.keys_file, keys_cli_command(settings.keys_file, "generate", "--name", "my-app"),
            )
        elif settings.metrics_auth_enabled and not any(METRICS_GROUP in e.groups for e in store.ring.entries):
            from gateway.keys import command as keys_cli_command

            log.warning(
                "METRICS_AUTH_ENABLED=true but no API key has the metrics route group: /metrics answers 403 to "
                "every key. Give your scraper's key one with: %s",
                keys_cli_command(settings.keys_file, "update", "--name", "<id>", "--routes", "metrics"),
            )
        app.cleanup_ctx.append(_keys_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    if settings.access_log:
        app.cleanup_ctx.append(_access_log_ctx)
    if settings.usage_ledger:
        app.cleanup_ctx.append(_ledger_ctx)
    app.cleanup_ctx.append(_observer_ctx)
    app.cleanup_ctx.append(_pipeline_ctx)
    health.add_routes(app)
    scrape.add_routes(app)
    proxy.add_routes(app, settings.passthrough_routes)
    app.router.add_post("/reload", reload_keys)
    if settings.models:
        admin.add_routes(app)
    return app
