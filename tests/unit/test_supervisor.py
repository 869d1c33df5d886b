"""The supervisor's states: the table of allowed transitions, each refused one, and each allowed one made for real
with the tiny fake llama-server (start, crash, restart, crash loop, stop); the crash-loop policy on a fake clock."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from lifecycle.backend import Backend
from lifecycle.crashloop import CrashLoop, Verdict
from lifecycle.settings import Settings
from lifecycle.supervisor import TRANSITIONS, BackendStartError, BackendState, StateError, Supervisor
from tests.conftest import ROOT, free_port, pid_alive

FAKE = ROOT / "tests" / "fakes" / "fake_llama_server.py"
S = BackendState

# Written out again on purpose: the table in lifecycle/supervisor.py must say exactly this.
ALLOWED = {
    S.STOPPED: {S.LOADING},
    S.LOADING: {S.READY, S.STOPPING},
    S.READY: {S.RESTARTING, S.DOWN, S.STOPPING},
    S.RESTARTING: {S.READY, S.RESTARTING, S.DOWN, S.STOPPING},
    S.DOWN: {S.READY, S.DOWN, S.RESTARTING, S.STOPPING},
    S.STOPPING: {S.STOPPED},
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings_for(tmp_path: Path, **env: str) -> Settings:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    return Settings.from_env({"DATA_DIR": str(tmp_path), "LLAMA_SERVER_BIN": str(FAKE), "MODEL_PATH": str(model),
                              "PORT_BACKEND": str(free_port()), "CTX": "512", "BACKEND_RESTART_DELAY": "0.05",
                              "BACKEND_STOP_TIMEOUT": "5", **env}, probe_roots=[])


def record(backend: Backend, then: Callable[[list[BackendState]], None] | None = None) -> list[BackendState]:
    """Every state the supervisor enters, in order (and `then` called after each)."""
    sup = backend._supervisor
    seen: list[BackendState] = []
    enter = sup._enter

    def spy(state: BackendState) -> None:
        enter(state)
        seen.append(state)
        if then is not None:
            then(seen)

    sup._enter = spy  # type: ignore[method-assign]
    return seen


async def until(check: Callable[[], object], timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def kill(backend: Backend) -> int:
    pid = backend.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return pid


# --- the table ------------------------------------------------------------------------------------------------------


def test_the_table_is_the_documented_one() -> None:
    assert set(TRANSITIONS) == set(BackendState)
    assert {old: set(new) for old, new in TRANSITIONS.items()} == ALLOWED


@pytest.mark.parametrize(("old", "new"), list(itertools.product(BackendState, BackendState)))
def test_enter_allows_exactly_the_table(old: BackendState, new: BackendState) -> None:
    sup = Supervisor(Settings.from_env({"DATA_DIR": "/srv/data"}, probe_roots=[]))
    sup._state = old
    if new in ALLOWED[old]:
        sup._enter(new)
        assert sup.state is new
    else:
        with pytest.raises(StateError, match=f"from {old} to {new}"):
            sup._enter(new)
        assert sup.state is old, "a refused transition changes nothing"


def test_state_is_read_only() -> None:
    sup = Supervisor(Settings.from_env({"DATA_DIR": "/srv/data"}, probe_roots=[]))
    with pytest.raises(AttributeError):
        sup.state = BackendState.READY  # type: ignore[misc]


# --- every allowed transition, made by the real supervisor around the fake llama-server --------------------------

START_STOP = [S.LOADING, S.READY, S.STOPPING, S.STOPPED]
EXITS_WHILE_LOADING = [S.LOADING, S.STOPPING, S.STOPPED]
CRASH_RESTART = [S.LOADING, S.READY, S.RESTARTING, S.READY, S.STOPPING, S.STOPPED]
CRASH_LOOP_EXIT = [S.LOADING, S.READY, S.RESTARTING, S.RESTARTING, S.DOWN, S.STOPPING, S.STOPPED]
ONE_CRASH_IS_A_LOOP_RETRY = [S.LOADING, S.READY, S.DOWN, S.READY, S.STOPPING, S.STOPPED]
RETRY_WINDOW_MOVES_ON = [S.LOADING, S.READY, S.RESTARTING, S.DOWN, S.DOWN, S.RESTARTING, S.READY, S.STOPPING,
                         S.STOPPED]
STOP_DURING_BACKOFF = [S.LOADING, S.READY, S.RESTARTING, S.STOPPING, S.STOPPED]
STOP_WHILE_LOADING = [S.LOADING, S.STOPPING, S.STOPPED]
SCENARIOS = [START_STOP, EXITS_WHILE_LOADING, CRASH_RESTART, CRASH_LOOP_EXIT, ONE_CRASH_IS_A_LOOP_RETRY,
             RETRY_WINDOW_MOVES_ON, STOP_DURING_BACKOFF, STOP_WHILE_LOADING]


def test_the_scenarios_make_every_allowed_transition() -> None:
    made = {pair for seen in SCENARIOS for pair in zip([S.STOPPED, *seen], seen, strict=False)}
    assert made == {(old, new) for old, news in ALLOWED.items() for new in news}


def test_start_then_stop(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = Backend(settings_for(tmp_path), poll_interval=0.05)
        seen = record(backend)
        await backend.start()
        pid = backend.pid
        assert backend.ready and backend.up and pid is not None and backend.model_id == "m.gguf"
        await backend.stop()
        assert seen == START_STOP and not backend.up and not pid_alive(pid)
        await backend.stop()  # idempotent: no transition
        assert seen == START_STOP
        with pytest.raises(StateError, match="starts once"):
            await backend._supervisor.start(FAKE, tmp_path / "m.gguf")

    asyncio.run(scenario())


def test_exit_while_loading_fails_start_with_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "exit_loading")

    async def scenario() -> None:
        backend = Backend(settings_for(tmp_path), poll_interval=0.05)
        seen = record(backend)
        with pytest.raises(BackendStartError, match="exited with code 3 while loading") as err:
            await backend.start()
        assert "not a GGUF file" in str(err.value)
        assert seen == EXITS_WHILE_LOADING and backend.state is S.STOPPED
        await backend.stop()  # nothing left to do
        assert seen == EXITS_WHILE_LOADING

    asyncio.run(scenario())


def test_a_crash_is_restarted(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = Backend(settings_for(tmp_path), poll_interval=0.05)
        seen = record(backend)
        await backend.start()
        first = kill(backend)
        await until(lambda: backend.restarts == 1 and backend.ready)
        assert backend.pid != first and "exited unexpectedly with code -9" in (backend.last_error or "")
        await backend.stop()
        assert seen == CRASH_RESTART and not backend.gave_up.is_set()

    asyncio.run(scenario())


def test_crash_loop_with_exit_gives_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart that dies while loading is one more crash (restarting -> restarting); the third makes the loop."""
    async def scenario() -> None:
        backend = Backend(settings_for(tmp_path, BACKEND_RESTART_LIMIT="3"), poll_interval=0.05)
        seen = record(backend)
        await backend.start()
        monkeypatch.setenv("FAKE_MODE", "exit_loading")  # every later start of the fake fails
        kill(backend)
        await asyncio.wait_for(backend.gave_up.wait(), 20)
        assert backend.state is S.DOWN and backend.restarts == 0 and not backend.up
        assert "exited unexpectedly with code 3" in (backend.last_error or "")
        await backend.stop()
        assert seen == CRASH_LOOP_EXIT

    asyncio.run(scenario())


def test_crash_loop_with_retry_recovers(tmp_path: Path) -> None:
    async def scenario() -> None:
        settings = settings_for(tmp_path, BACKEND_RESTART_LIMIT="1", BACKEND_CRASH_LOOP="retry",
                                BACKEND_RESTART_MAX_DELAY="0.1")
        backend = Backend(settings, poll_interval=0.05)
        seen = record(backend)
        await backend.start()
        kill(backend)
        await until(lambda: backend.restarts == 1 and backend.ready)
        await backend.stop()
        assert seen == ONE_CRASH_IS_A_LOOP_RETRY and not backend.gave_up.is_set()

    asyncio.run(scenario())


def test_retry_counts_crashes_on_the_injected_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Down, still down, then (the fake clock jumps past BACKEND_RESTART_WINDOW) only restarting again."""
    clock = FakeClock()

    def steer(seen: list[BackendState]) -> None:
        if seen[-2:] == [S.DOWN, S.DOWN]:
            clock.now += 1000  # the earlier crashes leave the window
        elif seen[-2:] == [S.DOWN, S.RESTARTING]:
            monkeypatch.setenv("FAKE_MODE", "ready")  # the next start succeeds

    async def scenario() -> None:
        settings = settings_for(tmp_path, BACKEND_RESTART_LIMIT="2", BACKEND_RESTART_WINDOW="60",
                                BACKEND_CRASH_LOOP="retry", BACKEND_RESTART_MAX_DELAY="0.1")
        backend = Backend(settings, poll_interval=0.05, clock=clock)
        seen = record(backend, steer)
        await backend.start()
        monkeypatch.setenv("FAKE_MODE", "exit_loading")
        kill(backend)
        await until(lambda: backend.restarts == 1 and backend.ready)
        await backend.stop()
        assert seen == RETRY_WINDOW_MOVES_ON

    asyncio.run(scenario())


def test_stop_during_the_backoff(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = Backend(settings_for(tmp_path, BACKEND_RESTART_DELAY="30"), poll_interval=0.05)
        seen = record(backend)
        await backend.start()
        kill(backend)
        await until(lambda: backend.state is S.RESTARTING)
        async with asyncio.timeout(5):  # does not wait out the 30 s
            await backend.stop()
        assert seen == STOP_DURING_BACKOFF

    asyncio.run(scenario())


def test_stop_while_loading_cancels_the_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_MODE", "never_ready")

    async def scenario() -> None:
        backend = Backend(settings_for(tmp_path), poll_interval=0.05)
        seen = record(backend)
        start = asyncio.create_task(backend.start())
        await until(lambda: backend.pid is not None)
        pid = backend.pid
        assert pid is not None
        await backend.stop()
        assert start.done() and (start.cancelled() or isinstance(start.exception(), BackendStartError))
        assert seen == STOP_WHILE_LOADING and not pid_alive(pid)

    asyncio.run(scenario())


# --- the crash-loop policy ----------------------------------------------------------------------------------------


def policy(clock: FakeClock, **env: str) -> CrashLoop:
    return CrashLoop(Settings.from_env({"DATA_DIR": "/srv/data", "BACKEND_RESTART_DELAY": "1",
                                        "BACKEND_RESTART_MAX_DELAY": "5", "BACKEND_RESTART_LIMIT": "4",
                                        "BACKEND_RESTART_WINDOW": "100", **env}, probe_roots=[]), clock)


def test_backoff_doubles_then_the_loop_gives_up() -> None:
    clock = FakeClock()
    loop = policy(clock)
    verdicts = []
    for _ in range(4):
        verdicts.append(loop.crashed())
        clock.now += 1
    assert verdicts == [Verdict(False, 1), Verdict(False, 2), Verdict(False, 4), Verdict(True, None)]


def test_retry_waits_the_maximum_once_down() -> None:
    clock = FakeClock()
    loop = policy(clock, BACKEND_CRASH_LOOP="retry", BACKEND_RESTART_LIMIT="2")
    assert loop.crashed() == Verdict(False, 1)
    assert loop.crashed() == Verdict(True, 5)
    assert loop.crashed() == Verdict(True, 5)


def test_crashes_leave_the_window() -> None:
    clock = FakeClock()
    loop = policy(clock)
    for _ in range(3):
        loop.crashed()
    clock.now += 100  # the window is (now - 100, now]
    assert loop.crashed() == Verdict(False, 1) and loop.recent == 1


def test_a_restart_that_cannot_run_llama_server_is_a_crash(tmp_path: Path) -> None:
    """Before, the watch died on the OSError: no more restarts, and /health said restarting for good."""
    binary = tmp_path / "llama-server"
    binary.write_bytes(FAKE.read_bytes())
    binary.chmod(0o755)

    async def scenario() -> None:
        backend = Backend(settings_for(tmp_path, LLAMA_SERVER_BIN=str(binary), BACKEND_RESTART_LIMIT="2"),
                          poll_interval=0.05)
        seen = record(backend)
        await backend.start()
        binary.chmod(0o644)  # no longer executable
        kill(backend)
        await asyncio.wait_for(backend.gave_up.wait(), 20)
        assert seen == [S.LOADING, S.READY, S.RESTARTING, S.DOWN]
        assert backend.last_error == f"cannot run {binary}: Permission denied"
        await backend.stop()

    asyncio.run(scenario())
