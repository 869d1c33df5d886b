"""The access log: one line per request in <log_dir>/access.log, written by a thread so the event loop never waits.

write() only puts the record on a queue; a background thread formats, writes, flushes once per batch and rotates
(access.log -> access.log.1 -> ... -> access.log.<backups>) when the next line would pass max_bytes. Records carry
no keys, no prompts and no query strings: only the fields of AccessRecord reach the file.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import IO

log = logging.getLogger("gateway.access")

FORMATS = ("text", "json")
FILE_NAME = "access.log"
MAX_PENDING = 100_000  # records queued but not yet written; past this (a stuck disk) new ones are dropped
FLUSH_INTERVAL = 0.05  # seconds between writes; close() flushes at once

# Control characters, spaces and quotes escaped in text lines, so a decoded path cannot forge a line or a column.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x21), 0x22, 0x5C, 0x7F)}


@dataclass(slots=True)
class AccessRecord:
    time: float  # wall clock, time.time() at the request's arrival
    request_id: str
    key_id: str | None
    method: str
    path: str  # anything after "?" is dropped when written
    status: int
    duration_ms: float
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@lru_cache(maxsize=4)
def _second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(t: float) -> str:
    second, millis = divmod(int(t * 1000), 1000)
    return f"{_second(second)}.{millis:03d}Z"  # strftime once per second, not once per line


def _path(path: str) -> str:
    return path.split("?", 1)[0]


def _dash(value: int | float | None, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def format_text(rec: AccessRecord) -> str:
    """time request_id key_id method path status duration_ms ttft_ms prompt_tokens completion_tokens ("-" = none)."""
    return " ".join((
        _timestamp(rec.time),
        rec.request_id.translate(_ESCAPES) or "-",
        (rec.key_id or "-").translate(_ESCAPES),
        rec.method.translate(_ESCAPES),
        _path(rec.path).translate(_ESCAPES) or "-",
        str(rec.status),
        f"{rec.duration_ms:.1f}",
        _dash(rec.ttft_ms, ".1f"),
        _dash(rec.prompt_tokens),
        _dash(rec.completion_tokens),
    ))


def format_json(rec: AccessRecord) -> str:
    return json.dumps({
        "time": _timestamp(rec.time),
        "request_id": rec.request_id,
        "key_id": rec.key_id,
        "method": rec.method,
        "path": _path(rec.path),
        "status": rec.status,
        "duration_ms": round(rec.duration_ms, 1),
        "ttft_ms": None if rec.ttft_ms is None else round(rec.ttft_ms, 1),
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
    }, separators=(",", ":"))


class _RotatingFile:
    """Append-only file with size-capped rotation; used by the writer thread only."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.stream: IO[bytes] = open(path, "ab")  # noqa: SIM115 - held open for the life of the log
        self.size = self.stream.tell()

    def write(self, data: bytes) -> None:
        if self.max_bytes > 0 and self.size > 0 and self.size + len(data) > self.max_bytes:
            self.rotate()
        self.stream.write(data)
        self.size += len(data)

    def write_lines(self, lines: list[str]) -> None:
        data = "".join(lines).encode("utf-8", "backslashreplace")
        if self.max_bytes <= 0 or self.size + len(data) <= self.max_bytes:
            self.stream.write(data)  # the usual case: the whole batch in one go
            self.size += len(data)
            return
        for line in lines:  # line by line, so rotation happens at the cap
            self.write(line.encode("utf-8", "backslashreplace"))

    def rotate(self) -> None:
        self.stream.close()
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            self.stream = open(self.path, "ab")  # noqa: SIM115
        else:
            self.stream = open(self.path, "wb")  # noqa: SIM115 - no backups: start over
        self.size = 0

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


_STOP = object()


class AccessLog:
    """`AccessLog(settings.log_dir, ...)`; write() from the event loop, close() once on shutdown.

    The constructor creates log_dir and opens the file, so a path that cannot be written fails at start-up (OSError).
    """

    def __init__(self, log_dir: Path, fmt: str = "text", max_bytes: int = 10_000_000, backups: int = 5) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format {fmt!r} is not one of {', '.join(FORMATS)}")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.path = log_dir / FILE_NAME
        self._format = format_json if fmt == "json" else format_text
        self._file = _RotatingFile(self.path, max_bytes, backups)
        self._queue: queue.SimpleQueue[AccessRecord | object] = queue.SimpleQueue()
        self._closed = False
        self._wake = threading.Event()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def write(self, record: AccessRecord) -> None:
        """Queue one record; never blocks. Dropped (and counted) after close() or when the writer is far behind."""
        if self._closed or self._queue.qsize() >= MAX_PENDING:
            self.dropped += 1
            return
        self._queue.put(record)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, close the file and join the thread (at most `timeout` seconds)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        # Wake a few times a second and write everything queued in one go, rather than once per request:
        # a thread woken per line fights the event loop for the GIL under load.
        failed = False
        stop = False
        while not stop:
            self._wake.wait(FLUSH_INTERVAL)
            lines = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(item, AccessRecord):  # _STOP: everything queued before it is drained
                    stop = True
                    break
                try:
                    lines.append(self._format(item) + "\n")
                except Exception:  # a malformed record costs its own line, never the writer thread
                    log.exception("cannot format an access log record")
            if not lines:
                continue
            try:
                self._file.write_lines(lines)
                self._file.flush()
                failed = False
            except (OSError, ValueError) as exc:
                if not failed:  # one warning per run of failures, not one per line
                    log.warning("cannot write the access log %s: %s", self.path, exc)
                failed = True
        try:
            self._file.close()
        except OSError as exc:
            log.warning("cannot close the access log %s: %s", self.path, exc)
