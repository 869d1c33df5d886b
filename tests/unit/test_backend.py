"""lifecycle.backend.Backend, the facade both entry points hold: failure classification (and how the gateway and
the handler act on it), the per-boot key kept inside lifecycle/, provisioning that a stop does not wait for."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lifecycle.backend import START_ERRORS, Backend, Failure, off_loop
from lifecycle.downloads import ProvisionError
from lifecycle.settings import Settings
from lifecycle.upstream import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from tests.conftest import ROOT
from tests.unit.test_supervisor import settings_for as supervisor_settings

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"


def settings_for(tmp_path: Path, **env: str) -> Settings:
    """The supervisor tests' settings (the fake backend), with auth off and slow restarts."""
    return supervisor_settings(tmp_path, **{"AUTH_ENABLED": "false", "BACKEND_RESTART_DELAY": "30", **env})


# --- classification -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "failure"), [
    (UpstreamConnectError("refused"), Failure.RESTARTING),  # nothing reached it
    (UpstreamDisconnected(False), Failure.RESTARTING),  # dropped before any byte, and no llama-server is up
    (UpstreamDisconnected(True), Failure.BROKEN),  # it had started answering: never send twice
    (UpstreamTimeout("slow"), Failure.TIMEOUT),
    (UpstreamTooLarge(1024), Failure.TOO_LARGE),
    (UpstreamError("unparseable answer from the backend"), Failure.BROKEN),
])
def test_classify_without_a_live_backend(tmp_path: Path, exc: UpstreamError, failure: Failure) -> None:
    backend = Backend(settings_for(tmp_path))
    assert asyncio.run(backend.classify(exc, 4242)) is failure  # pid 4242 is not (or no longer) ours


def test_classify_tells_died_under_it_from_up_and_dropped_it(tmp_path: Path) -> None:
    """The same early drop is BROKEN while that llama-server lives on, RESTARTING once it has exited."""
    async def scenario() -> tuple[Failure, Failure]:
        backend = Backend(settings_for(tmp_path), poll_interval=0.05)
        await backend.start()
        try:
            pid = backend.pid
            up = await backend.classify(UpstreamDisconnected(False), pid)  # waits `gone`'s 2 s, then: it is up
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            died = await backend.classify(UpstreamDisconnected(False), pid)
            return up, died
        finally:
            await backend.stop()

    assert asyncio.run(scenario()) == (Failure.BROKEN, Failure.RESTARTING)


@pytest.mark.parametrize(("exc", "status", "code"), [
    (UpstreamConnectError("refused"), 503, "backend_unavailable"),
    (UpstreamDisconnected(False), 503, "backend_unavailable"),
    (UpstreamDisconnected(True), 502, "backend_error"),
    (UpstreamTimeout("slow"), 504, None),
    (UpstreamTooLarge(1024), 502, "backend_answer_too_large"),
])
def test_the_gateway_answers_what_classify_says(tmp_path: Path, exc: UpstreamError, status: int,
                                                code: str | None) -> None:
    from gateway.pipeline import Pipeline

    settings = settings_for(tmp_path)
    pipeline = Pipeline(settings, Backend(settings), None, None, None, None, None, None)  # type: ignore[arg-type]
    refusal = asyncio.run(pipeline.backend_failed("POST", "/v1/completions", "rid", exc))
    assert (refusal.status, refusal.code) == (status, code)
    if status == 503:
        assert refusal.headers and refusal.headers["Retry-After"]


def test_the_handler_answers_what_classify_says(tmp_path: Path) -> None:
    """A whole answer over MAX_RESPONSE_SIZE fails the job with that reason, and is not sent again."""
    from handler.worker import JobHandler

    settings = dataclasses.replace(settings_for(tmp_path), max_response_size=16)

    async def scenario() -> list[object]:
        backend = Backend(settings, poll_interval=0.05)
        await backend.start()
        try:
            handler = JobHandler(settings, backend, backend_wait=5)
            return [item async for item in handler.run({"id": "j", "input": {"openai_route": "/v1/models"}})]
        finally:
            await backend.stop()

    (result,) = asyncio.run(scenario())
    assert isinstance(result, dict) and "MAX_RESPONSE_SIZE" in result["error"]


# --- the per-boot key stays in lifecycle/ -----------------------------------------------------------------------


def test_nothing_public_holds_the_key(tmp_path: Path) -> None:
    backend = Backend(settings_for(tmp_path))
    key = backend._supervisor._api_key
    client = backend.client(stream_idle_timeout=1.0, max_response_size=1 << 20)
    for owner in (backend, backend._supervisor, client):
        assert key not in repr(owner)
        for name in dir(owner):
            if not name.startswith("_"):
                assert key not in repr(getattr(owner, name)), f"{type(owner).__name__}.{name} shows the key"


def test_clients_connect_within_upstream_connect_timeout(tmp_path: Path) -> None:
    """Both modes: the handler's client used a fixed 10 s before."""
    from handler.worker import JobHandler

    backend = Backend(settings_for(tmp_path, UPSTREAM_CONNECT_TIMEOUT="2.5"))
    assert backend.client().connect_timeout == 2.5
    assert backend.client(connect_timeout=1).connect_timeout == 1

    async def handlers_client() -> float:
        return JobHandler(backend.settings, backend)._upstream().connect_timeout

    assert asyncio.run(handlers_client()) == 2.5


# The key as an attribute, the supervisor behind the facade, an upstream client built by hand (it needs the key),
# the key's maker; and, in our own code, llama-server's variable for it.
KEY_READS = re.compile(r"\._?api_key\b|\b_supervisor\b|\bUpstream\(|\bbackend_key\(")
OUR_CODE = ("gateway", "handler")


def test_nothing_outside_lifecycle_reads_the_key() -> None:
    """gateway/, handler/ and bench/ only get upstream clients from Backend.client(). bench/ runs llama-servers of
    its own, with keys of its own, for baselines; the stand-in llama-servers (fake_*.py) read the key as
    llama-server does."""
    offenders = []
    for folder in (*OUR_CODE, "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.startswith("fake_"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if KEY_READS.search(line) or (folder in OUR_CODE and "LLAMA_API_KEY" in line):
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_key_check_would_catch_the_old_reads() -> None:
    for line in ("Upstream(backend.base_url, backend.api_key, connect_timeout=1)",
                 "self.backend._supervisor._api_key", "key = sup._api_key"):
        assert KEY_READS.search(line), line


# --- provisioning ---------------------------------------------------------------------------------------------------


def test_provisioning_errors_come_out_of_start(tmp_path: Path) -> None:
    settings = dataclasses.replace(settings_for(tmp_path), model_path=tmp_path / "missing.gguf")
    backend = Backend(settings)
    with pytest.raises(ProvisionError, match="model not found"):
        asyncio.run(backend.start())
    assert issubclass(ProvisionError, START_ERRORS)


STOP_DURING_BUILD = """
import asyncio, sys, time
from lifecycle.backend import Backend
from lifecycle.settings import Settings

def build_for_minutes(self):
    print("building", flush=True)
    time.sleep(60)

Backend._provision = build_for_minutes

async def main():
    backend = Backend(Settings.from_env({"DATA_DIR": sys.argv[1]}, probe_roots=[]))
    start = asyncio.create_task(backend.start())
    await asyncio.sleep(0.3)
    await backend.stop()
    print("cancelled" if start.cancelled() else "not cancelled", flush=True)

asyncio.run(main())
"""


def test_stop_does_not_wait_for_provisioning(tmp_path: Path) -> None:
    """A SIGTERM during a first-run build (minutes) ends the process at once: the build's thread is not joined
    at exit, as asyncio.to_thread's would be."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", STOP_DURING_BUILD, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=50)
    assert proc.stdout.split() == ["building", "cancelled"], proc.stderr
    assert proc.returncode == 0 and time.monotonic() - started < 20


def test_off_loop_returns_and_raises() -> None:
    async def scenario() -> None:
        assert await off_loop(lambda: 42) == 42
        with pytest.raises(ProvisionError, match="nope"):
            await off_loop(lambda: (_ for _ in ()).throw(ProvisionError("nope")))

    asyncio.run(scenario())
