"""The usage ledger (gateway/ledger.py): batched additive writes, shared files, failed writes kept, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import json
import logging
import sqlite3
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway import keys, ledger
from gateway.ledger import HOUR, Ledger, hour_of, parse_since, read_totals, render, summed
from gateway.metrics import Metrics
from gateway.observe import JSON, SSE, Answer, Observer

NOW = 1_780_000_000.0  # a fixed unix time (2026-05-28)


def rows(path: Path) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute("SELECT key_id, model, hour, requests, prompt_tokens, completion_tokens, cached_tokens, "
                            "errors, ttft_sum, ttft_count FROM usage ORDER BY key_id, model, hour").fetchall()


def totals(path: Path, **kwargs: object) -> list[ledger.Total]:
    with contextlib.closing(ledger.open_read_only(path)) as conn:
        return read_totals(conn, **kwargs)  # type: ignore[arg-type]


def test_adds_are_batched_in_memory_and_written_additively(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    book = Ledger(db)
    book.add("alice", "smol", NOW, 10, 5, 3, ttft=0.25)
    book.add("alice", "smol", NOW + 1, 4, 2, 0, error=True)
    book.add("bob", "", NOW)
    assert book.pending == 2 and not db.exists()  # nothing written before a flush
    assert book.flush() and book.pending == 0 and book.writes == 1
    book.add("alice", "smol", NOW + 2, 1, 1, 1, ttft=0.75)
    assert book.flush() and book.flush()  # an empty flush writes nothing
    assert book.writes == 2
    book.close()
    hour = hour_of(NOW)
    assert rows(db) == [("alice", "smol", hour, 3, 15, 8, 4, 1, 1.0, 2), ("bob", "", hour, 1, 0, 0, 0, 0, 0.0, 0)]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == ledger.SCHEMA_VERSION


def test_rows_are_bucketed_per_utc_hour(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    book = Ledger(db)
    start = hour_of(NOW)
    for when in (start, start + HOUR - 1, start + HOUR, start + 5 * HOUR + 7):
        book.add("k", "m", when, 1, 1)
    book.close()
    assert [(hour - start, requests) for _, _, hour, requests, *_ in rows(db)] == [(0, 2), (HOUR, 1), (5 * HOUR, 1)]
    assert start % HOUR == 0


def test_the_writer_thread_writes_by_itself_and_on_close(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    book = Ledger(db, interval=0.05)
    book.start()
    book.add("k", "m", NOW, 1, 2)
    deadline = threading.Event()
    for _ in range(100):  # up to 5 s; written within one interval in practice
        with contextlib.suppress(sqlite3.OperationalError):  # the file exists a moment before its table
            if db.exists() and rows(db):
                break
        deadline.wait(0.05)
    assert rows(db)[0][3:6] == (1, 1, 2)
    book.add("k", "m", NOW, 1, 2)
    book.close(5)  # the last write happens on close
    assert rows(db)[0][3:6] == (2, 2, 4)


def test_two_writers_share_one_file(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    books = [Ledger(db, interval=0.01) for _ in range(2)]
    for book in books:
        book.start()

    def work(book: Ledger) -> None:
        for i in range(500):
            book.add(f"key{i % 3}", "m", NOW, 2, 1)

    threads = [threading.Thread(target=work, args=(book,)) for book in books]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for book in books:
        book.close(10)
    assert summed(totals(db)) == {"requests": 1000, "errors": 0, "prompt_tokens": 2000, "completion_tokens": 1000,
                                  "cached_tokens": 0}


def test_a_failed_write_keeps_its_counts_and_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "usage.sqlite3"
    book = Ledger(db, timeout=0.05)
    book.add("k", "m", NOW, 1, 1)
    assert book.flush()
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock for longer than the busy timeout
    caplog.set_level(logging.INFO, "gateway.ledger")
    book.add("k", "m", NOW, 10, 10)
    assert not book.flush()
    book.add("k", "m", NOW, 100, 100)
    assert not book.flush()
    assert book.pending == 1
    assert caplog.text.count("cannot write") == 1
    locker.execute("ROLLBACK")
    locker.close()
    assert book.flush()
    assert "writing" in caplog.text and book.pending == 0
    book.close()
    assert rows(db)[0][3:6] == (3, 111, 111)


def test_a_ledger_that_cannot_be_opened_is_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    book = Ledger(blocker / "usage.sqlite3")  # under a file: never creatable
    book.open()
    assert "cannot open" in caplog.text
    book.add("k", "m", NOW)
    assert not book.flush() and book.pending == 1
    book.close()


def test_a_newer_format_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {ledger.SCHEMA_VERSION + 1}")
    with pytest.raises(ledger.LedgerError, match="format"):
        ledger.connect(db)


def test_totals_filter_by_since_key_and_model(tmp_path: Path) -> None:
    db = tmp_path / "usage.sqlite3"
    book = Ledger(db)
    book.add("alice", "smol", NOW - 3 * 86400, 100, 100)  # three days ago
    book.add("alice", "smol", NOW, 1, 2, 1, ttft=0.1)
    book.add("alice", "big", NOW, 5, 5)
    book.add("bob", "smol", NOW - 7200, 7, 7, error=True)
    book.close()
    everything = totals(db)
    assert [(t.key_id, t.model, t.requests) for t in everything] == [("alice", "big", 1), ("alice", "smol", 2),
                                                                      ("bob", "smol", 1)]
    now = datetime.fromtimestamp(NOW, UTC)
    day = totals(db, since=now - timedelta(days=1))
    assert summed(day)["prompt_tokens"] == 1 + 5 + 7
    assert [t.key_id for t in totals(db, key_id="bob")] == ["bob"]
    assert [t.model for t in totals(db, model="smol")] == ["smol", "smol"]
    assert totals(db, key_id="carol") == []
    # since counts whole hours: the hour `since` falls in is included
    assert summed(totals(db, since=now - timedelta(hours=2)))["errors"] == 1


def test_parse_since() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_since("24h", now) == now - timedelta(hours=24)
    assert parse_since("7d", now) == now - timedelta(days=7)
    assert parse_since("90m", now) == now - timedelta(minutes=90)
    assert parse_since("2026-04-01", now) == datetime(2026, 4, 1, tzinfo=UTC)
    assert parse_since("2026-04-01T10:00:00+02:00", now) == datetime(2026, 4, 1, 8, tzinfo=UTC)
    with pytest.raises(Exception, match="not 7d"):
        parse_since("yesterday", now)


def sample_totals() -> list[ledger.Total]:
    hour = hour_of(NOW)
    return [ledger.Total("alice", "smol", 3, 1, 30, 12, 20, 0.5, 2, hour, hour + HOUR),
            ledger.Total("bob", "", 1, 0, 0, 0, 0, 0.0, 0, hour, hour)]


def test_render_table_csv_and_json() -> None:
    table = render(sample_totals()).splitlines()
    assert table[0].split() == ["KEY", "ID", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "CACHED", "TTFT",
                                "MS", "FROM", "TO"]
    assert table[1].split()[:8] == ["alice", "smol", "3", "1", "30", "12", "20", "250.0"]
    assert len(render(sample_totals(), header=False).splitlines()) == 2
    records = list(csv.DictReader(io.StringIO(render(sample_totals(), "csv"))))
    assert records[0]["key_id"] == "alice" and records[0]["cached_tokens"] == "20" and records[1]["model"] == ""
    assert records[0]["first_hour"] == "2026-05-28T20:00Z"
    data = json.loads(render(sample_totals(), "json"))
    assert data[0] == {"key_id": "alice", "model": "smol", "requests": 3, "errors": 1, "prompt_tokens": 30,
                       "completion_tokens": 12, "cached_tokens": 20, "ttft_ms": 250.0,
                       "first_hour": "2026-05-28T20:00Z", "last_hour": "2026-05-28T21:00Z"}
    assert data[1]["ttft_ms"] is None


def test_cli_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.delenv("USAGE_DB", raising=False)
    monkeypatch.delenv("AUTH_KEYS_FILE", raising=False)
    assert keys.main(["usage"]) == 0  # no ledger yet: says so, prints nothing, exits 0
    out = capsys.readouterr()
    assert out.out == "" and "does not exist" in out.err
    book = Ledger(tmp_path / "usage.sqlite3")
    book.add("alice", "smol", datetime.now(UTC).timestamp(), 4, 2, 1)
    book.add("bob", "smol", datetime.now(UTC).timestamp(), 1, 1)
    book.close()
    before = (tmp_path / "usage.sqlite3").stat().st_mtime_ns
    assert keys.main(["usage", "--json", "--since", "1h"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["key_id"], r["prompt_tokens"]) for r in data] == [("alice", 4), ("bob", 1)]
    assert keys.main(["usage", "--csv", "--key", "bob"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("bob,smol,1,")
    assert keys.main(["usage", "--model", "none"]) == 0
    assert capsys.readouterr().out == ""
    other = tmp_path / "other.sqlite3"
    monkeypatch.setenv("USAGE_DB", str(other))
    assert keys.main(["usage"]) == 0 and str(other) in capsys.readouterr().err
    assert keys.main(["usage", "--db", str(tmp_path / "usage.sqlite3")]) == 0
    assert "alice" in capsys.readouterr().out
    assert (tmp_path / "usage.sqlite3").stat().st_mtime_ns == before  # read-only
    assert keys.main(["usage", "--since", "soon"]) == 2
    assert keys.main(["usage", "--csv", "--json"]) == 2


def test_the_observer_feeds_the_ledger(tmp_path: Path) -> None:
    """Every API request with a key id, by model; the usage the answer carried; errors; streams' TTFT."""
    body = json.dumps({"usage": {"prompt_tokens": 9, "completion_tokens": 4,
                                 "prompt_tokens_details": {"cached_tokens": 6}}}).encode()
    stream = (b'data: {"choices":[],"usage":{"completion_tokens":3,"prompt_tokens":5,'
              b'"prompt_tokens_details":{"cached_tokens":2}}}\n\ndata: [DONE]\n\n')

    async def run() -> None:
        book = Ledger(tmp_path / "usage.sqlite3")
        metrics = Metrics(CollectorRegistry())
        observer = Observer(metrics, None, lambda: "smol", book)
        chat = "/v1/chat/completions"
        observer.record(chat, "POST", 200, "alice", 0.1, "r1", None, None, Answer(JSON, body))
        observer.record(chat, "POST", 200, "alice", 0.1, "r2", None, 0.05, Answer(SSE, stream, 3))
        observer.record(chat, "POST", 429, "alice", 0.1, "r3", "rate", None, None)
        observer.record("/v1/models", "GET", 200, "alice", 0.1, "r4", None, None, None)
        observer.record(chat, "POST", 401, None, 0.1, "r5", "auth", None, None)  # no key: not in the ledger
        observer.record("/health", "GET", 200, "alice", 0.1, "r6", None, None, None)  # not an API route
        observer.record(chat, "POST", 200, "bob", 0.1, "r7", None, None, Answer(JSON, body), "big")
        observer.flush()
        book.close()
        by = {(t.key_id, t.model): t for t in totals(tmp_path / "usage.sqlite3")}
        assert set(by) == {("alice", "smol"), ("alice", ""), ("bob", "big")}
        alice = by[("alice", "smol")]
        assert (alice.requests, alice.errors, alice.prompt_tokens, alice.completion_tokens, alice.cached_tokens,
                alice.ttft_count) == (3, 1, 14, 7, 8, 1)
        assert alice.ttft_sum == pytest.approx(0.05)
        assert by[("alice", "")].requests == 1
        assert metrics.cached[("alice", "smol")] == 8 and metrics.cached[("bob", "big")] == 6
        text = metrics.render(None)[0]
        assert b'gateway_cached_prompt_tokens_total{key_id="alice",model="smol"} 8.0' in text

    asyncio.run(run())


def test_settings_name_the_ledger() -> None:
    from lifecycle.settings import Settings

    base = Settings.from_env({"DATA_DIR": "/srv/data"}, probe_roots=[])
    assert base.usage_ledger is True and base.usage_db == Path("/srv/data/usage.sqlite3")
    given = Settings.from_env({"DATA_DIR": "/srv/data", "USAGE_DB": "/var/lib/u.db", "USAGE_LEDGER": "off"},
                              probe_roots=[])
    assert given.usage_ledger is False and given.usage_db == Path("/var/lib/u.db")
