"""`python -m handler`: RunPod serverless mode.

Starts llama-server through the shared lifecycle, waits until it is ready (logging the cold start), then hands
control to `runpod.serverless.start`, which picks its own mode:
- RUNPOD_WEBHOOK_GET_JOB set: the real queue worker;
- `--rp_serve_api --rp_api_port N`: the SDK's local API server (/run, /runsync, /stream, /status), which stops a
  job whose client went away (handler.localapi);
- otherwise: local test mode, running ./test_input.json (or --test_input '{...}') once and exiting.
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before the imports below: the cold-start breakdown counts them

import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

from handler import localapi  # noqa: E402
from handler.coldstart import ColdStart  # noqa: E402
from handler.concurrency import concurrency_modifier  # noqa: E402
from handler.worker import JobHandler, collect  # noqa: E402
from lifecycle.backend import START_ERRORS, Backend  # noqa: E402
from lifecycle.background import BackgroundBackend  # noqa: E402
from lifecycle.logs import setup_logging  # noqa: E402
from lifecycle.settings import BAD_SETTINGS_EXIT, Settings, load_settings  # noqa: E402

log = logging.getLogger("handler")


def _serving_api(env: dict[str, str], argv: list[str]) -> bool:
    """The SDK will run its local API server (it does so before looking at the queue)."""
    return any(arg.startswith("--rp_serve_api") for arg in argv) or bool(env.get("RUNPOD_REALTIME_PORT"))


def _local_test_mode(env: dict[str, str], argv: list[str]) -> bool:
    return not env.get("RUNPOD_WEBHOOK_GET_JOB") and not _serving_api(env, argv)


def _on_sigterm(signum: int, _frame: FrameType | None) -> None:
    # The SDK installs its own SIGTERM handling once its worker loop or API server runs; until then (and after they
    # hand the signal back) a SIGTERM ends main() through SystemExit, so the backend is stopped and the logs flushed.
    raise SystemExit(128 + signum)


def main() -> int:
    cold = ColdStart(STARTED)
    cold.mark("imports")
    settings = load_settings()
    if settings is None:
        return BAD_SETTINGS_EXIT
    listener = setup_logging(settings)
    cold.mark("settings")
    backend = BackgroundBackend(settings)
    # From here on a SIGTERM (the platform stopping us, or our own after a crash loop) always ends in the finally
    # below, also while llama-server loads or the SDK is imported.
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        try:
            code = _serve(settings, backend, cold)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 1 if backend.failed else code
    finally:
        backend.stop()
        listener.stop()


def _import_sdk(cold: ColdStart) -> None:
    """`import runpod`, without py-cpuinfo's probe: runpod.serverless.utils.rp_debugger calls
    cpuinfo.get_cpu_info() at import, for a processor name its debug output shows, and that runs CPUID in a
    child process (about 1.2 s of a 1.8 s import on a 2-core machine). While the SDK is imported, the name comes
    from /proc/cpuinfo instead (Linux; elsewhere py-cpuinfo runs as before)."""
    # The SDK reads its settings from the environment at import; it logs at DEBUG unless told otherwise.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")
    brand = _cpu_brand()
    try:
        import cpuinfo
    except ImportError:
        cpuinfo = None
    real = getattr(cpuinfo, "get_cpu_info", None)
    if cpuinfo is not None and real is not None and brand is not None:
        cpuinfo.get_cpu_info = lambda: {"brand_raw": brand}
    try:
        import runpod  # noqa: F401
    finally:
        if cpuinfo is not None and real is not None:
            cpuinfo.get_cpu_info = real
    cold.mark("sdk")


def _cpu_brand() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _serve(settings: Settings, backend: BackgroundBackend, cold: ColdStart) -> int:
    try:
        # The SDK is imported while llama-server loads, not after.
        cold_start = backend.start(meanwhile=lambda: _import_sdk(cold))
    except START_ERRORS as exc:
        log.error("%s", exc)
        return 1
    if backend.backend.provisioned_at is not None:
        cold.mark("provision", backend.backend.provisioned_at)
    cold.mark("llama-server ready")
    log.info("cold start: llama-server ready %.2fs after process start (model %s, %d slots)",
             cold_start, backend.backend.model_id, settings.parallel)
    import runpod

    def first_job() -> None:
        cold.mark("first job")
        log.info("%s", cold.line())

    env, argv = dict(os.environ), sys.argv[1:]
    if _serving_api(env, argv):
        localapi.install()  # a request whose client went away stops its job
    local = _local_test_mode(env, argv)
    runpod.serverless.start(start_config(settings, backend.backend, local=local, on_first_job=first_job))
    return 0


def start_config(settings: Settings, backend: Backend, *, local: bool,
                 on_first_job: Callable[[], None] | None = None) -> dict[str, Any]:
    """What runpod.serverless.start is given. The concurrency follows the backend's slots (handler.concurrency);
    `on_first_job` is called once, when the first job has been answered (the cold-start breakdown)."""
    handler = JobHandler(settings, backend)
    if on_first_job is not None:
        handler.on_first_job = on_first_job
    return {
        "handler": collect(handler.run) if local else handler.run,
        "return_aggregate_stream": True,
        "concurrency_modifier": concurrency_modifier(settings, backend),
    }


if __name__ == "__main__":
    sys.exit(main())
