"""`python -m handler`: RunPod serverless mode.

Starts llama-server through the shared lifecycle, waits until it is ready (logging the cold start), then hands
control to `runpod.serverless.start`, which picks its own mode:
- RUNPOD_WEBHOOK_GET_JOB set: the real queue worker;
- `--rp_serve_api --rp_api_port N`: the SDK's local API server (/run, /runsync, /stream, /status);
- otherwise: local test mode, running ./test_input.json (or --test_input '{...}') once and exiting.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from handler.concurrency import concurrency_modifier
from handler.worker import JobHandler, collect
from lifecycle.backend import START_ERRORS, Backend
from lifecycle.background import BackgroundBackend
from lifecycle.logs import setup_logging
from lifecycle.settings import BAD_SETTINGS_EXIT, Settings, load_settings

log = logging.getLogger("handler")


def _local_test_mode(env: dict[str, str], argv: list[str]) -> bool:
    serving = any(arg.startswith("--rp_serve_api") for arg in argv) or env.get("RUNPOD_REALTIME_PORT")
    return not env.get("RUNPOD_WEBHOOK_GET_JOB") and not serving


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # The SDK installs its own SIGTERM handling once its worker loop or API server runs; until then (and after they
    # hand the signal back) a SIGTERM ends main() through SystemExit, so the backend is stopped and the logs flushed.
    raise SystemExit(128 + signum)


def main() -> int:
    settings = load_settings()
    if settings is None:
        return BAD_SETTINGS_EXIT
    listener = setup_logging(settings)
    backend = BackgroundBackend(settings)
    # From here on a SIGTERM (the platform stopping us, or our own after a crash loop) always ends in the finally
    # below, also while llama-server loads or the SDK is imported.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            code = _serve(settings, backend)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 1 if backend.failed else code
    finally:
        backend.stop()
        listener.stop()


def _serve(settings: Settings, backend: BackgroundBackend) -> int:
    try:
        cold_start = backend.start()
    except START_ERRORS as exc:
        log.error("%s", exc)
        return 1
    log.info("cold start: llama-server ready %.2fs after process start (model %s, %d slots)",
             cold_start, backend.backend.model_id, settings.parallel)
    # The SDK reads its settings from the environment at import; it logs at DEBUG unless told otherwise.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    import runpod

    runpod.serverless.start(start_config(settings, backend.backend, local=_local_test_mode(dict(os.environ),
                                                                                           sys.argv[1:])))
    return 0


def start_config(settings: Settings, backend: Backend, *, local: bool) -> dict[str, Any]:
    """What runpod.serverless.start is given. The concurrency follows the backend's slots (handler.concurrency)."""
    handler = JobHandler(settings, backend)
    return {
        "handler": collect(handler.run) if local else handler.run,
        "return_aggregate_stream": True,
        "concurrency_modifier": concurrency_modifier(settings, backend),
    }


if __name__ == "__main__":
    sys.exit(main())
