"""Logging for both modes: stderr plus a boot log under $DATA_DIR/logs/_boot/, written off the event loop."""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
import time

from lifecycle.settings import Settings
from lifecycle.supervisor import instance_id

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(settings: Settings, level: int = logging.INFO) -> logging.handlers.QueueListener:
    """Route every record through a queue to a listener thread, so file writes never block the loop.

    The caller stops the returned listener on exit (it flushes what is queued).
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    boot_dir = settings.boot_log_dir
    try:
        boot_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d_%H%M%S")
        path = boot_dir / f"{stamp}_boot_{instance_id()}.log"
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))  # private: it names clients and keys ids
        handlers.append(logging.FileHandler(path))
    except OSError as exc:
        print(f"warning: cannot write boot logs under {boot_dir}: {exc.strerror}", file=sys.stderr)
    formatter = logging.Formatter(FORMAT)
    for handler in handlers:
        handler.setFormatter(formatter)
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    listener.start()
    return listener

