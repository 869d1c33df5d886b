"""HTTP mode's main loop: start-up, serve, shutdown against one deadline.

1. Both listeners come up first (the health port answers while the model loads; the main port answers 503).
2. lifecycle.backend.Backend provisions llama-server and the model off the loop, then starts it.
3. Signal handlers only record the signal; the loop acts on it. A second SIGINT/SIGTERM forces exit.
4. Shutdown stops the listeners, then the backend. Only __main__ calls sys.exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.app import create_app
from gateway.connections import Connections, adopt
from gateway.drain import Drain
from gateway.fastlane import FastLane
from gateway.health import create_health_app
from gateway.state import CONNECTIONS, REQUEST_IDS, STATS
from lifecycle.backend import START_ERRORS, Backend
from lifecycle.settings import Settings

log = logging.getLogger("gateway.server")
MAX_PARSED_LINE = 4 * 8192


def _limits(settings: Settings) -> dict[str, float]:
    # aiohttp's parser stops headers at the nominal limits (MAX_HEADERS lines of MAX_HEADER_LINE_SIZE), so a
    # connection that never finishes its headers holds at most that much; gateway.connections answers its refusals
    # as OpenAI-shaped 431s. The request line may be longer than the 414 limit the gate answers exactly, up to
    # this bound.
    return {
        "max_line_size": MAX_PARSED_LINE,
        "max_field_size": settings.max_header_line_size,
        "max_headers": settings.max_headers,
        # A stalled client (idle, or stuck inside its headers) is dropped after CLIENT_TIMEOUT; after an early
        # error answer (408, 413) the unread rest of a body is drained for at most 2 s.
        "keepalive_timeout": settings.client_timeout,
        "lingering_time": 2.0,
    }


class _NoRequestContent(logging.Filter):
    """aiohttp logs a malformed request with its raw bytes, which may hold a key: keep only what went wrong."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            record.msg = "bad request from %s: %s"
            record.args = (*(record.args or ("?",))[:1], record.exc_info[1].__class__.__name__)
            record.exc_info = None
            record.exc_text = None
        return True


class _Listener:
    """One port: aiohttp's runner for the app and, on PORT with FAST_LANE, the fast lane in front of it."""

    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner
        self.server: asyncio.AbstractServer | None = None
        self.lane: FastLane | None = None

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.lane is not None:
            self.lane.close()
        await self.runner.cleanup()


async def _listen(
    app: web.Application, host: str, port: int, settings: Settings, fast: bool, connections: Connections
) -> _Listener:
    # handler_cancellation: a client that disconnects cancels its handler at once, so it leaves the queue, or
    # its upstream request is closed and llama-server stops generating for nobody.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0,
                           **_limits(settings))
    await runner.setup()
    listener = _Listener(runner)
    try:
        assert runner.server is not None
        server = adopt(runner.server, connections, settings.client_timeout)
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.BaseProtocol] = server
        if fast:
            listener.lane = FastLane(app, server, loop)
            factory = listener.lane
        listener.server = await loop.create_server(factory, host, port, backlog=1024, reuse_address=True)
    except BaseException:
        await runner.cleanup()
        raise
    return listener


async def _drain(app: web.Application, timeout: float) -> None:
    """Let in-flight API requests finish, up to DRAIN_TIMEOUT; new ones already get 503."""
    stats = app[STATS]
    deadline = asyncio.get_running_loop().time() + timeout
    if stats.requests_active:
        log.info("draining %d in-flight request(s), up to %gs", stats.requests_active, timeout)
    while stats.requests_active and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    if stats.requests_active:
        log.warning("DRAIN_TIMEOUT: %d request(s) still running are cut off", stats.requests_active)


async def serve(settings: Settings) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)  # the child dies with us (PR_SET_PDEATHSIG)
        log.info("%s received: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    logging.getLogger("aiohttp.server").addFilter(_NoRequestContent())
    backend = Backend(settings)
    drain = Drain()
    app = create_app(settings, backend, drain)
    listeners: list[_Listener] = []
    try:
        for one, port, fast, connections in (
            (create_health_app(drain, lambda: backend.ready), settings.port_health, False,
             Connections(settings.max_connections, app[REQUEST_IDS])),
            (app, settings.port, settings.fast_lane, app[CONNECTIONS]),
        ):
            listeners.append(await _listen(one, settings.host, port, settings, fast, connections))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, port, exc.strerror or exc)
        for listener in listeners:
            await listener.close()
        return 1
    log.info("gateway listening on http://%s:%d (health port %d)", settings.host, settings.port, settings.port_health)
    code = 0
    try:
        start = asyncio.create_task(_start_backend(settings, backend))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
        else:
            start.result()
            gave_up = asyncio.create_task(backend.gave_up.wait())
            await asyncio.wait({stopped, gave_up}, return_when=asyncio.FIRST_COMPLETED)
            gave_up.cancel()
            if backend.gave_up.is_set() and not stop.is_set():
                log.error("the backend is in a crash loop (BACKEND_CRASH_LOOP=exit): exiting so the platform "
                          "replaces this instance")
                code = 1
        drain.draining = True
        await _drain(app, settings.drain_timeout)
    except START_ERRORS as exc:
        log.error("%s", exc)
        code = 1
    finally:
        drain.draining = True
        for listener in reversed(listeners):
            await listener.close()
        await backend.stop()
        log.info("stopped")
    return code


async def _start_backend(settings: Settings, backend: Backend) -> None:
    await backend.start()
    auth = ' -H "Authorization: Bearer <your key>"' if settings.auth_enabled else ""
    log.info(
        "ready: model %s on http://localhost:%d\n  try: curl http://localhost:%d/v1/chat/completions%s "
        "-H 'Content-Type: application/json' -d '{\"model\": \"any\", \"messages\": "
        "[{\"role\": \"user\", \"content\": \"Hello!\"}]}'",
        backend.model_id, settings.port, settings.port, auth,
    )
