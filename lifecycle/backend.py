"""The backend: one llama-server, used the same way by the gateway (HTTP mode) and the serverless handler.

`Backend` is all either entry point holds of it:
- `start()` provisions what llama-server needs (a writable DATA_DIR, the binary found or built, the model resolved)
  and has the supervisor start it; `stop()` stops it, also while start() is still running.
- `client(...)` hands out upstream clients to llama-server. The per-boot key never leaves lifecycle/: nothing else
  can read it, from here or from the clients.
- `classify(exc, pid)` says what a failed upstream request means: the one rule both request paths act on.
- With several models (MODELS): `choose(requested)` picks a request's model (lifecycle.router), `models` is the
  ModelSet served, `router` the router's statuses and load/unload, `refresh_models()` looks for new files.
- Read-only state for /health, /metrics and the handler: `state`, `ready`, `up`, `pid`, `model_id`, `restarts`,
  `last_error`, `last_log_lines`, `offload`, `gone(pid)`, `provisioned_at` (the cold-start line); `gave_up` is
  set when the crash-loop policy (lifecycle.crashloop, BACKEND_CRASH_LOOP=exit) gives up, for the entry point to
  exit non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import NamedTuple, TypeVar

from lifecycle.downloads import ProvisionError
from lifecycle.llama_server import ensure_llama_server, server_version
from lifecycle.model import resolve_model, resolve_reference
from lifecycle.router import ModelSet, Router, ServedModel, plan
from lifecycle.settings import Settings, SettingsError
from lifecycle.supervisor import BackendStartError, BackendState, Supervisor, config_files, ensure_writable_dir
from lifecycle.upstream import (
    Upstream,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
)

log = logging.getLogger("lifecycle.backend")
T = TypeVar("T")

# What start() raises when the backend cannot come up; str() is the one message to log.
START_ERRORS = (ProvisionError, BackendStartError)


class Failure(enum.Enum):
    """What a failed upstream request means (Backend.classify)."""

    RESTARTING = "restarting"  # nothing reached llama-server, or it died under the request: safe to send again
    BROKEN = "broken"  # it is up and dropped or garbled the request: never send it twice
    TIMEOUT = "timeout"  # it did not answer in time
    TOO_LARGE = "too_large"  # its whole answer is over MAX_RESPONSE_SIZE


async def off_loop(fn: Callable[[], T]) -> T:
    """fn() in a daemon thread. Not asyncio.to_thread: its threads are joined at exit, so a SIGTERM during a
    first-run build would wait minutes for it; a stop cancels the wait here, and the thread is simply left."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # else cancelled meanwhile
            outcome()

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task
            outcome = partial(done.set_exception, exc)
        else:
            outcome = partial(done.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name="llama-server-provision", daemon=True).start()
    return await done


class Pending(NamedTuple):
    id: str


class Backend:
    def __init__(
        self, settings: Settings, *, poll_interval: float = 0.25, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._supervisor = Supervisor(settings, poll_interval=poll_interval, clock=clock)
        self._starting: asyncio.Task[object] | None = None
        self.provisioned_at: float | None = None  # time.monotonic() when the first start's provisioning ended

    # --- lifetime --------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Provision, start llama-server and return once it is ready. Raises one of START_ERRORS."""
        self._starting = asyncio.current_task()
        try:
            binary, model = await off_loop(self._provision)
            if self.provisioned_at is None:
                self.provisioned_at = time.monotonic()
            await self._supervisor.start(binary, model)
        finally:
            self._starting = None

    def _provision(self) -> tuple[Path, Path | ModelSet]:
        """What llama-server needs, in order; blocking (a first build takes minutes)."""
        settings = self.settings
        # An unwritable DATA_DIR fails first, with one line, before minutes of building or downloading.
        ensure_writable_dir(settings.log_dir, settings.data_dir)
        binary = ensure_llama_server(settings.llama_server_bin, settings.cache_dir, os.environ)
        version = server_version(binary)
        model: Path | ModelSet
        if settings.models:
            model = self._plan()
            log.info("llama-server %s (%s); router mode, models: %s (default %s)", binary, version,
                     ", ".join(m.id for m in model.models), model.default)
        else:
            model = resolve_model(settings)
            log.info("llama-server %s (%s); model %s", binary, version, model)
        for path in config_files(os.environ):
            log.warning("llama-server will also read its config file %s: settings there apply under the gateway's "
                        "own command line", path)
        return binary, model

    def _plan(self) -> ModelSet:
        try:
            return plan(self.settings, lambda ref: resolve_reference(ref, self.settings))
        except SettingsError as exc:  # MODELS_PRESET, DEFAULT_MODEL or names that clash: one line, exit 1
            raise ProvisionError(str(exc)) from None

    async def refresh_models(self) -> ModelSet:
        """Plan MODELS again (new files in MODELS_DIR, a changed MODELS_PRESET) and have the router reload its
        list. Raises START_ERRORS or SettingsError (the old list stays), UpstreamError."""
        models = await off_loop(self._plan)
        await self._supervisor.replace_models(models)
        return models

    def choose(self, requested: object) -> ServedModel | Pending:
        """The model a request's `model` means (lifecycle.router.ModelSet.choose); before the models are planned,
        a placeholder (the request then gets the backend's 503 while it loads)."""
        models = self._supervisor.models
        if models is None:
            return Pending(requested if isinstance(requested, str) else "")
        return models.choose(requested)

    async def stop(self) -> None:
        """Stop llama-server (SIGTERM, SIGKILL after BACKEND_STOP_TIMEOUT); a start() still running is cancelled
        first. Idempotent; safe when start() never ran."""
        starting = self._starting
        if starting is not None and starting is not asyncio.current_task():
            starting.cancel()
            await asyncio.wait({starting})
        await self._supervisor.stop()

    # --- talking to it ---------------------------------------------------------------------------------------

    def client(
        self, *, connect_timeout: float | None = None, stream_idle_timeout: float | None = None,
        max_response_size: int | None = None,
    ) -> Upstream:
        """A new upstream client to llama-server (close it when done). connect_timeout defaults to
        UPSTREAM_CONNECT_TIMEOUT; no stream idle limit and no answer size limit unless given."""
        return self._supervisor.client(connect_timeout=connect_timeout, stream_idle_timeout=stream_idle_timeout,
                                       max_response_size=max_response_size)

    async def classify(self, exc: UpstreamError, pid: int | None) -> Failure:
        """What a failed upstream request means; `pid` is Backend.pid when it was sent (or as it failed).

        RESTARTING: nothing reached llama-server (the connection was refused), or it died while the request was on
        its way (the connection dropped before any answer byte, and that llama-server exits within `gone`'s wait):
        nobody got anything from it, so it may be sent again once the backend is ready. TOO_LARGE and TIMEOUT say
        so. BROKEN: anything else: the backend is up and dropped or garbled it, which must not run twice."""
        if isinstance(exc, UpstreamTooLarge):
            return Failure.TOO_LARGE
        if isinstance(exc, UpstreamTimeout):
            return Failure.TIMEOUT
        if isinstance(exc, UpstreamConnectError):
            return Failure.RESTARTING
        if isinstance(exc, UpstreamDisconnected) and not exc.got_bytes and await self.gone(pid):
            return Failure.RESTARTING
        return Failure.BROKEN

    async def gone(self, pid: int | None, within: float = 2.0) -> bool:
        """Whether the llama-server that had `pid` has exited, waiting up to `within` seconds for the supervisor to
        notice. Safe to await from any event loop: it only reads state."""
        return await self._supervisor.gone(pid, within)

    # --- read-only state -------------------------------------------------------------------------------------

    @property
    def state(self) -> BackendState:
        return self._supervisor.state

    @property
    def ready(self) -> bool:
        return self._supervisor.ready

    @property
    def up(self) -> bool:
        return self._supervisor.up

    @property
    def pid(self) -> int | None:
        return self._supervisor.pid

    @property
    def model_id(self) -> str | None:
        return self._supervisor.model_id

    @property
    def models(self) -> ModelSet | None:
        return self._supervisor.models

    @property
    def router(self) -> Router | None:
        return self._supervisor.router

    @property
    def restarts(self) -> int:
        return self._supervisor.restarts

    @property
    def last_error(self) -> str | None:
        return self._supervisor.last_error

    @property
    def last_log_lines(self) -> list[str]:
        return self._supervisor.last_log_lines

    @property
    def offload(self) -> dict[str, object] | None:
        return self._supervisor.offload

    @property
    def gave_up(self) -> asyncio.Event:
        return self._supervisor.gave_up
