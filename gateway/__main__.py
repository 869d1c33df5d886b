"""`python -m gateway`: HTTP mode."""

from __future__ import annotations

import asyncio
import logging
import sys

from gateway.server import serve
from lifecycle.logs import setup_logging
from lifecycle.settings import BAD_SETTINGS_EXIT, load_settings

log = logging.getLogger("gateway")


def _loop_factory():  # type: ignore[no-untyped-def]
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> int:
    settings = load_settings()
    if settings is None:
        return BAD_SETTINGS_EXIT
    listener = setup_logging(settings)
    try:
        for note in settings.deprecations:
            log.warning("%s", note)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(serve(settings))
    finally:
        listener.stop()


if __name__ == "__main__":
    sys.exit(main())
