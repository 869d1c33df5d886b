"""How many jobs the worker takes at once: the SDK's `concurrency_modifier`.

What runpod 1.12 does with it (runpod/serverless/modules/rp_scale.py):
- `JobScaler.get_jobs` calls `set_scale()` before every job take (line 182), and `set_scale` calls the modifier
  with the current value (line 88); the worker starts at 1 (line 47).
- It then asks the queue for `concurrency - (jobs queued + jobs in progress)` jobs (lines 184, 195): the free places
  in job units are the SDK's subtraction, so the modifier gives the capacity, not what is free now.
- A value different from the last one resizes its queue, but only once *no* job is queued or in flight: until then
  it takes nothing at all (lines 90-99). So a value that moved with every job would stall the worker after each
  one. The value here moves only when the backend's capacity does: it goes down to 1 while llama-server is not
  ready (a restart: the jobs it takes wait for it, up to BACKEND_WAIT_TIMEOUT, and the others stay on RunPod's
  queue for workers that can run them now) and back up once it is.

The capacity is the backend's slots: PARALLEL with one model; with several (MODELS), each model loaded by the router
has its own PARALLEL slots and at most MODELS_MAX are loaded at once (0: no limit), so PARALLEL * min(models,
MODELS_MAX). Which model a job needs is known only once the job is taken (the SDK's job take cannot pick), so
the worker counts every model it may load; jobs for one model beyond its PARALLEL wait in llama-server's queue.
A job asking n > 1 completions (request_rules.slots_needed) is still one job here: its extra completions wait for
slots in llama-server, as an HTTP request's do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from lifecycle.router import ModelSet
from lifecycle.settings import Settings

log = logging.getLogger("handler")


def desired_concurrency(*, parallel: int, models: int | None, models_max: int, ready: bool) -> int:
    """Jobs to take at once. `models`: how many models are served (None: one model, no router);
    `models_max`: MODELS_MAX (0 = no limit); `ready`: whether llama-server answers now."""
    if not ready:
        return 1
    if models is None:
        return max(1, parallel)
    loadable = models if models_max <= 0 else min(models, models_max)
    return max(1, parallel * max(1, loadable))


class BackendView(Protocol):
    @property
    def ready(self) -> bool: ...

    @property
    def models(self) -> ModelSet | None: ...


def concurrency_modifier(settings: Settings, backend: BackendView) -> Callable[[int], int]:
    """The callable for runpod.serverless.start: reads two attributes of the backend (no I/O, no lock), as it is
    called before every job take; logs each change of value."""

    def modifier(current: int) -> int:
        models = backend.models
        value = desired_concurrency(parallel=settings.parallel, models=None if models is None else len(models.models),
                                    models_max=settings.models_max, ready=backend.ready)
        if value != current:
            log.info("concurrency: %d jobs at once (was %d)%s", value, current,
                     "" if backend.ready else "; the backend is not ready")
        return value

    return modifier
