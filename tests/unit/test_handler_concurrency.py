"""handler.concurrency: the jobs one worker takes at once, and how runpod.serverless.start is given it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from handler.__main__ import start_config
from handler.concurrency import concurrency_modifier, desired_concurrency
from lifecycle.backend import Backend
from lifecycle.router import ModelSet, ServedModel
from lifecycle.settings import Settings


@pytest.mark.parametrize(
    ("parallel", "models", "models_max", "ready", "expected"),
    [
        (8, None, 4, True, 8),  # one model: its slots
        (1, None, 4, True, 1),
        (8, None, 4, False, 1),  # a restarting backend: one job waits for it, the rest stay on RunPod's queue
        (4, 2, 4, True, 8),  # several models: each loaded one has PARALLEL slots
        (4, 6, 4, True, 16),  # at most MODELS_MAX of them loaded at once
        (4, 6, 0, True, 24),  # MODELS_MAX=0: no limit, every model
        (4, 1, 4, True, 4),
        (4, 0, 4, True, 4),  # never below one model's slots
        (4, 6, 4, False, 1),
    ],
)
def test_desired_concurrency(parallel: int, models: int | None, models_max: int, ready: bool, expected: int) -> None:
    assert desired_concurrency(parallel=parallel, models=models, models_max=models_max, ready=ready) == expected


@dataclass
class FakeBackend:
    ready: bool = True
    models: ModelSet | None = None


def _settings(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"DATA_DIR": str(tmp_path), **env}, probe_roots=[])


def _models(n: int) -> ModelSet:
    return ModelSet(tuple(ServedModel(f"m{i}", Path(f"/m/m{i}.gguf")) for i in range(n)), "m0")


def test_the_modifier_follows_the_backend(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend()
    modifier = concurrency_modifier(_settings(tmp_path, PARALLEL="3", MODELS_MAX="2"), backend)
    with caplog.at_level(logging.INFO, "handler"):
        assert modifier(1) == 3
        assert modifier(3) == 3
        backend.ready = False
        assert modifier(3) == 1
        backend.ready = True
        backend.models = _models(5)
        assert modifier(1) == 6
    changes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("concurrency:")]
    # Logged only when the value changes, not on every call (the SDK calls it before every job take).
    assert changes == ["concurrency: 3 jobs at once (was 1)", "concurrency: 1 jobs at once (was 3); the backend is "
                       "not ready", "concurrency: 6 jobs at once (was 1)"]


def test_start_config_wires_the_modifier_to_the_real_backend(tmp_path: Path) -> None:
    settings = _settings(tmp_path, PARALLEL="4")
    backend = Backend(settings)
    config = start_config(settings, backend, local=False)
    assert config["return_aggregate_stream"] is True
    modifier = config["concurrency_modifier"]
    assert modifier(1) == 1  # not started: not ready
    backend._supervisor.ready = True
    assert modifier(1) == 4
    assert start_config(settings, backend, local=True)["handler"] is not config["handler"]


def test_the_sdk_takes_as_many_jobs_as_slots_and_resizes_only_when_idle(tmp_path: Path) -> None:
    """What runpod 1.12's JobScaler does with the modifier (rp_scale.set_scale): why its value moves only with the
    backend's capacity, never with each job."""
    from runpod.serverless.modules.rp_scale import JobScaler
    from runpod.serverless.modules.worker_state import JobsProgress

    backend = FakeBackend()
    config = start_config(_settings(tmp_path, PARALLEL="4"), backend, local=False)  # type: ignore[arg-type]
    scaler = JobScaler(config)

    async def scenario() -> None:
        await scaler.set_scale()
        assert scaler.current_concurrency == 4 and scaler.jobs_queue.maxsize == 4
        job = {"id": "in-flight"}
        JobsProgress().add(job)
        try:
            await asyncio.wait_for(scaler.set_scale(), 1)  # same value: no resize, returns at once
            assert scaler.current_concurrency - scaler.current_occupancy() == 3  # what it asks the queue for
            backend.ready = False
            with pytest.raises(asyncio.TimeoutError):  # a new value waits until no job is in flight
                await asyncio.wait_for(scaler.set_scale(), 0.3)
        finally:
            JobsProgress().remove(job)
        await asyncio.wait_for(scaler.set_scale(), 3)
        assert scaler.jobs_queue.maxsize == 1

    asyncio.run(scenario())
