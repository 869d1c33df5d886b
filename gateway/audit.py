"""The audit log: who changed keys or models, and when, as append-only JSON lines in $DATA_DIR/logs/audit/audit.jsonl.

One JSON object per line:

    {"time": "2026-05-01T12:00:00.123456+00:00", "who": "cli", "action": "key.create", "target": "partner",
     "from": "cli pid=4242 user=root host=gpu-1", "result": "ok", "details": {"rate_limit": 20, ...}}

- `who`: the key id of the caller (HTTP), `cli` (python -m gateway.keys), `signal` (SIGHUP) or `watcher` (the
  gateway noticed a changed keys file by itself);
- `action`: what was attempted (ACTIONS); `result`: ok, refused (not allowed) or failed (allowed, did not work);
- `target`: the key id or model id acted on, or null; `from`: the client address, or the CLI's process, user and
  host; `details`: a few plain facts (what changed, counts, an HTTP status).

It never holds a key, a hash or a line of the keys file: callers pass only ids, numbers and words, and `details`
is checked to hold nothing but those (`_plain`).

Every line is one os.write() on a file opened with O_APPEND, so the gateway and any number of CLI runs can write
at once without interleaving (POSIX appends of one write are atomic on a local file system). The folder is made
0700 and the file 0600; when root (the CLI under `docker exec`) creates either, it gives them to the owner of the
folder above, so the gateway's unprivileged user can still append. Writing never raises: `write` returns the
reason it could not, and the gateway's `record` runs it on one thread of its own (in order, off the event loop)
and warns once until a write succeeds again.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import socket
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger("gateway.audit")

FILE_NAME = "audit.jsonl"
DIR_MODE = 0o700
FILE_MODE = 0o600
OK, REFUSED, FAILED = "ok", "refused", "failed"
CLI, SIGNAL, WATCHER = "cli", "signal", "watcher"

ACTIONS = (
    "key.create", "key.rotate", "key.update", "key.remove", "key.import",  # python -m gateway.keys
    "keys.reload",  # POST /reload, SIGHUP, the file watcher
    "model.load", "model.unload", "models.refresh",  # the admin routes
)

Plain = str | int | float | bool | None


def _plain(value: object) -> object:
    """`value` when it is JSON made of plain scalars (lists and dicts of them too), else ValueError."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, set | frozenset):
        return sorted(str(_plain(item)) for item in value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    raise ValueError(f"not a plain value for the audit log: {type(value).__name__}")


def entry(who: str, action: str, target: str | None, source: str, result: str = OK,
          details: Mapping[str, object] | None = None, now: datetime | None = None) -> dict[str, object]:
    """One audit record as a dict, in the order it is written."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    if result not in (OK, REFUSED, FAILED):
        raise ValueError(f"unknown audit result {result!r}")
    return {
        "time": (now or datetime.now(UTC)).isoformat(timespec="microseconds"),
        "who": who,
        "action": action,
        "target": target,
        "from": source,
        "result": result,
        "details": _plain(dict(details or {})),
    }


def cli_source() -> str:
    """`from` for the key CLI: its process, user (and the sudo user behind it) and host."""
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (a container's bare uid)
        user = str(os.geteuid())
    parts = [f"cli pid={os.getpid()}", f"user={user}"]
    sudo = os.environ.get("SUDO_USER")
    if sudo:
        parts.append(f"sudo_user={sudo}")
    parts.append(f"host={socket.gethostname()}")
    return " ".join(parts)


def _owner_of(path: Path) -> tuple[int, int] | None:
    """The owner to give what root creates under `path` (None when not root, or unknown)."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_uid, st.st_gid) if st.st_uid != 0 else None


class AuditLog:
    """Appends audit records to `<directory>/audit.jsonl`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / FILE_NAME
        self._executor: ThreadPoolExecutor | None = None
        self._failing = False  # warned about the last failure; reset by a write that works
        self._closed = False

    # ------------------------------------------------------------ blocking (the CLI, the writer thread)

    def _ensure_dir(self) -> None:
        if self.directory.is_dir():
            return
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.directory, DIR_MODE)
        except FileExistsError:  # another writer was first: its folder, as it made it
            return
        os.chmod(self.directory, DIR_MODE)  # mkdir's mode is cut by the umask
        owner = _owner_of(self.directory.parent)
        if owner is not None:
            with contextlib.suppress(OSError):
                os.chown(self.directory, *owner)

    def write(self, record: Mapping[str, object]) -> str | None:
        """Append one record (see `entry`); None when written, else why not (no key can be in the reason)."""
        line = (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode()
        try:
            self._ensure_dir()
            flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
            try:
                fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, FILE_MODE)
                created = True
            except FileExistsError:
                fd = os.open(self.path, flags)
                created = False
            try:
                if created:
                    os.fchmod(fd, FILE_MODE)
                    owner = _owner_of(self.directory)
                    if owner is not None:
                        with contextlib.suppress(OSError):
                            os.fchown(fd, *owner)
                written = os.write(fd, line)  # one write: never interleaved with another writer's line
            finally:
                os.close(fd)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror or exc}"
        if written != len(line):
            return f"short write ({written} of {len(line)} bytes)"
        return None

    def add(self, who: str, action: str, target: str | None, source: str, result: str = OK,
            details: Mapping[str, object] | None = None) -> str | None:
        """Build and write one record now (blocking); None when written, else why not."""
        return self.write(entry(who, action, target, source, result, details))

    # ------------------------------------------------------------ the gateway (never blocks the loop, never fails)

    async def record(self, who: str | None, action: str, target: str | None, source: str | None,
                     result: str = OK, details: Mapping[str, object] | None = None) -> None:
        """Write one record on the audit thread (in order); a failure is one warning, never an exception."""
        try:
            record = entry(who or "unknown", action, target, source or "unknown", result, details)
            if self._closed:  # a straggler after close(): still written, on a thread of its own
                problem = await asyncio.to_thread(self.write, record)
            else:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
                problem = await asyncio.get_running_loop().run_in_executor(self._executor, self.write, record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not fail the request it records
            problem = type(exc).__name__
        if problem is None:
            if self._failing:
                log.info("audit log %s is writable again", self.path)
            self._failing = False
        elif not self._failing:
            self._failing = True
            log.warning("cannot write the audit log %s (%s): admin actions and key reloads go unrecorded until "
                        "it is writable", self.path, problem)

    def close(self) -> None:
        """Wait for the records queued so far, then stop the audit thread."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
