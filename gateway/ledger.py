"""The usage ledger: requests, tokens, errors and time to first token per API key id, model and UTC hour, in SQLite.

The request path never touches it. gateway.observe's batch (on the event loop, every FLUSH_INTERVAL) adds each
request to an in-memory dict (Ledger.add: a lock and a few additions); a writer thread with its own connection swaps
that dict out and writes it at most every WRITE_INTERVAL seconds, and once more on close. So a crash loses at most
about the last second; a clean stop loses nothing.

Every write is an additive UPSERT (`requests = requests + excluded.requests`, ...) of whole rows in one
transaction, so several gateway processes can share one database file: WAL mode, a busy timeout, BEGIN IMMEDIATE.
A write that fails (disk full, the file locked for longer than BUSY_TIMEOUT) keeps its counts for the next try and
logs one warning until a write succeeds again; it never reaches the event loop.

`python -m gateway.keys usage` reads it (read_totals, render); see docs/USAGE.md.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import re
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("gateway.ledger")

SCHEMA_VERSION = 1  # PRAGMA user_version
WRITE_INTERVAL = 0.5  # seconds between writes, at most
BUSY_TIMEOUT = 5.0  # seconds a write waits for another process's transaction
HOUR = 3600

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    hour INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    ttft_sum REAL NOT NULL DEFAULT 0,
    ttft_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, model, hour)
) WITHOUT ROWID
"""
COUNTS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "errors", "ttft_sum", "ttft_count")
UPSERT = (
    f"INSERT INTO usage (key_id, model, hour, {', '.join(COUNTS)}) VALUES (?, ?, ?{', ?' * len(COUNTS)}) "
    "ON CONFLICT (key_id, model, hour) DO UPDATE SET "
    + ", ".join(f"{name} = {name} + excluded.{name}" for name in COUNTS)
)

Bucket = tuple[str, str, int]  # (key_id, model, hour)


class LedgerError(Exception):
    """The database cannot be used: str() says why (a newer format, not a ledger)."""


def hour_of(when: float) -> int:
    """The unix time of the start of the UTC hour `when` falls in."""
    return int(when) // HOUR * HOUR


def connect(path: Path, timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    """A writing connection, the schema made or checked (any process may be the first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise LedgerError(f"{path} has ledger format {version}; this gateway writes format {SCHEMA_VERSION}")
            conn.execute(SCHEMA)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except BaseException:
        conn.close()
        raise
    return conn


def write(conn: sqlite3.Connection, rows: dict[Bucket, list[float]]) -> None:
    """Add `rows` to the ledger in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(UPSERT, [(*bucket, *counts) for bucket, counts in rows.items()])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class Ledger:
    """Owned by the app: add() on the event loop, a writer thread for the database; start() and close() once."""

    def __init__(self, path: Path, interval: float = WRITE_INTERVAL, timeout: float = BUSY_TIMEOUT) -> None:
        self.path = path
        self.interval = interval
        self.timeout = timeout
        self._lock = threading.Lock()
        self._pending: dict[Bucket, list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._failing = False  # a warning was logged; the next success says so
        self.writes = 0  # transactions committed (for tests)

    def add(self, key_id: str, model: str, when: float, prompt: int = 0, completion: int = 0, cached: int = 0,
            error: bool = False, ttft: float | None = None) -> None:
        """One request, answered at unix time `when`."""
        bucket = (key_id, model, hour_of(when))
        with self._lock:
            row = self._pending.get(bucket)
            if row is None:
                row = self._pending[bucket] = [0, 0, 0, 0, 0, 0.0, 0]
            row[0] += 1
            row[1] += prompt
            row[2] += completion
            row[3] += cached
            row[4] += error
            if ttft is not None:
                row[5] += ttft
                row[6] += 1

    @property
    def pending(self) -> int:
        """Buckets not written yet."""
        with self._lock:
            return len(self._pending)

    def open(self) -> None:
        """Make or check the database now (blocking: call it off the event loop), so a problem shows at start-up;
        on failure the writer tries again at every write."""
        try:
            self._conn = connect(self.path, self.timeout)
        except (sqlite3.Error, OSError, LedgerError) as exc:
            self._failing = True
            log.warning("usage ledger: cannot open %s (counts are kept and written once it can be): %s",
                        self.path, exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="usage-ledger", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the writer after one last write (blocking: call it off the event loop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("usage ledger: the last write to %s did not finish in time", self.path)
                return
        else:
            self.flush()
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()
        self.flush()

    def flush(self) -> bool:
        """Write what is pending now (the writer thread, or a test); False when that failed (the counts are kept)."""
        with self._lock:
            rows, self._pending = self._pending, {}
        if not rows:
            return True
        try:
            if self._conn is None:
                self._conn = connect(self.path, self.timeout)
            write(self._conn, rows)
        except (sqlite3.Error, OSError, LedgerError) as exc:
            self._keep(rows)
            if not self._failing:
                self._failing = True
                log.warning("usage ledger: cannot write %s (the counts are kept and written later): %s",
                            self.path, exc)
            if self._conn is not None and not isinstance(exc, sqlite3.OperationalError):
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
            return False
        self.writes += 1
        if self._failing:
            self._failing = False
            log.info("usage ledger: writing %s again", self.path)
        return True

    def _keep(self, rows: dict[Bucket, list[float]]) -> None:
        with self._lock:
            for bucket, counts in rows.items():
                row = self._pending.get(bucket)
                if row is None:
                    self._pending[bucket] = counts
                else:
                    for i, value in enumerate(counts):
                        row[i] += value


# --- reading: python -m gateway.keys usage -------------------------------------------------------------------------


class Total(NamedTuple):
    key_id: str
    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    ttft_sum: float
    ttft_count: int
    first_hour: int
    last_hour: int

    @property
    def ttft_ms(self) -> float | None:
        """Mean time to first token of the streams, in milliseconds."""
        return self.ttft_sum / self.ttft_count * 1000 if self.ttft_count else None


_RELATIVE = re.compile(r"(\d+)([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`7d`, `24h`, `90m` ago, or an ISO date / date-time (naive means UTC)."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        return now - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 7d, 24h, 90m or an ISO date/date-time") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def open_read_only(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT)
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    return conn


def read_totals(conn: sqlite3.Connection, since: datetime | None = None, key_id: str | None = None,
                model: str | None = None) -> list[Total]:
    """Totals per key id and model over the hours that start at or after the hour `since` falls in."""
    where, args = [], []
    if since is not None:
        where.append("hour >= ?")
        args.append(hour_of(since.timestamp()))
    if key_id is not None:
        where.append("key_id = ?")
        args.append(key_id)
    if model is not None:
        where.append("model = ?")
        args.append(model)
    query = ("SELECT key_id, model, SUM(requests), SUM(errors), SUM(prompt_tokens), SUM(completion_tokens), "
             "SUM(cached_tokens), SUM(ttft_sum), SUM(ttft_count), MIN(hour), MAX(hour) FROM usage"
             + (" WHERE " + " AND ".join(where) if where else "")
             + " GROUP BY key_id, model ORDER BY key_id, model")
    return [Total(*row) for row in conn.execute(query, args)]


FIELDS = ("key_id", "model", "requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens", "ttft_ms",
          "first_hour", "last_hour")


def _iso(hour: int) -> str:
    return datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H:00Z")


def _record(total: Total) -> dict[str, object]:
    ttft = total.ttft_ms
    return {
        "key_id": total.key_id, "model": total.model, "requests": total.requests, "errors": total.errors,
        "prompt_tokens": total.prompt_tokens, "completion_tokens": total.completion_tokens,
        "cached_tokens": total.cached_tokens, "ttft_ms": None if ttft is None else round(ttft, 1),
        "first_hour": _iso(total.first_hour), "last_hour": _iso(total.last_hour),
    }


def render(totals: Sequence[Total], fmt: str = "table", header: bool = True) -> str:
    """`table` (aligned columns, like `keys list`), `csv` or `json` (a list of objects)."""
    records = [_record(total) for total in totals]
    if fmt == "json":
        return json.dumps(records, indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        return out.getvalue()
    rows = [tuple("" if r[name] is None else str(r[name]) for name in FIELDS) for r in records]
    titles = ("KEY ID", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "CACHED", "TTFT MS", "FROM", "TO")
    table = [titles, *rows] if header else rows
    widths = [max(len(row[col]) for row in table) for col in range(len(titles))]
    return "".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() + "\n"
                   for row in table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m gateway.keys usage`."""
    parser.add_argument("--since", type=parse_since, help="7d, 24h, 90m ago, or an ISO date/date-time (UTC)")
    parser.add_argument("--key", help="one key id")
    parser.add_argument("--model", help="one model")
    parser.add_argument("--db", type=Path, help="the ledger (default: USAGE_DB, else $DATA_DIR/usage.sqlite3)")
    formats = parser.add_mutually_exclusive_group()
    formats.add_argument("--csv", dest="format", action="store_const", const="csv", help="CSV, with a header row")
    formats.add_argument("--json", dest="format", action="store_const", const="json", help="a JSON list")
    parser.set_defaults(format="table")


def usage_command(args: argparse.Namespace, default_db: Callable[[], Path], note: Callable[[str], None]) -> int:
    """`python -m gateway.keys usage`: totals per key and model, read-only; a missing ledger prints nothing."""
    path: Path = args.db or default_db()
    if not path.exists():
        note(f"no usage yet: {path} does not exist")
        return 0
    try:
        with contextlib.closing(open_read_only(path)) as conn:
            totals = read_totals(conn, args.since, args.key, args.model)
    except sqlite3.Error as exc:
        print(f"error: cannot read the usage ledger {path}: {exc}", file=sys.stderr)
        return 1
    if not totals:
        note(f"no usage in {path}" + (" for that selection" if args.since or args.key or args.model else ""))
        return 0
    sys.stdout.write(render(totals, args.format, header=not args.quiet))
    return 0


def summed(totals: Iterable[Total]) -> dict[str, int]:
    """Requests and token totals over `totals` (for tests and quick checks)."""
    out = dict.fromkeys(("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens"), 0)
    for total in totals:
        for name in out:
            out[name] += getattr(total, name)
    return out
