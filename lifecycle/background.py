"""The backend on its own event loop in a background thread, for hosts that own the main loop.

The RunPod SDK runs its own event loop (asyncio.run or uvicorn) and blocks in it, so serverless mode keeps
llama-server's lifecycle.backend.Backend on a private loop in this thread; everything it does (provisioning,
supervising) is the Backend's. The thread lives until stop(): it is the thread that forked llama-server, and
PR_SET_PDEATHSIG fires when that thread ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lifecycle.backend import Backend
from lifecycle.settings import Settings

log = logging.getLogger("lifecycle.background")

READY_POLL = 0.05  # seconds between readiness probes while llama-server starts


def process_age() -> float | None:
    """Seconds since this process started (Linux), for the cold-start log line."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


class BackgroundBackend:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # /health every 50 ms while llama-server loads (not 250): a serverless worker's cold start is billed and
        # waited on, and a 503 from /health costs llama-server next to nothing.
        self.backend = Backend(settings, poll_interval=READY_POLL)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="llama-server-lifecycle", daemon=True)
        self._started = time.monotonic()
        self.failed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def start(self, meanwhile: Callable[[], object] | None = None) -> float:
        """Backend.start() on the thread's loop, blocking until it is ready (or raises one of START_ERRORS);
        returns the cold-start seconds. `meanwhile()` runs in the caller's thread while llama-server loads (the
        handler imports the runpod SDK there); what it raises is raised here, the start going on."""
        self._thread.start()
        starting = asyncio.run_coroutine_threadsafe(self.backend.start(), self._loop)
        if meanwhile is not None:
            meanwhile()
        starting.result()
        asyncio.run_coroutine_threadsafe(self._exit_on_crash_loop(), self._loop)
        age = process_age()
        return age if age is not None else time.monotonic() - self._started

    async def _exit_on_crash_loop(self) -> None:
        """BACKEND_CRASH_LOOP=exit: stop the worker (the SDK drains on SIGTERM) so the platform replaces it."""
        await self.backend.gave_up.wait()
        self.failed = True
        log.error("the backend is in a crash loop (BACKEND_CRASH_LOOP=exit): stopping this worker")
        os.kill(os.getpid(), signal.SIGTERM)

    def _call(self, coro, timeout: float | None = None):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self.backend.stop(), timeout=self.settings.stop_timeout + 10)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.warning("stopping llama-server: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()  # here, not in the loop's __del__ at exit (a traceback on the way out)
