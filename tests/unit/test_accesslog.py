from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from gateway import accesslog
from gateway.accesslog import AccessLog, AccessRecord, format_json, format_text

T = 1_714_564_800.123  # 2024-05-01T12:00:00.123Z


def record(**changes: object) -> AccessRecord:
    fields: dict[str, object] = {
        "time": T, "request_id": "req-1", "key_id": "alice", "method": "POST", "path": "/v1/chat/completions",
        "status": 200, "duration_ms": 1234.56, "ttft_ms": 120.34, "prompt_tokens": 31, "completion_tokens": 8,
    }
    fields.update(changes)
    return AccessRecord(**fields)  # type: ignore[arg-type]


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_text_line() -> None:
    line = "2024-05-01T12:00:00.123Z req-1 alice POST /v1/chat/completions 200 1234.6 120.3 31 8"
    assert format_text(record()) == line
    empty = record(key_id=None, ttft_ms=None, prompt_tokens=None, completion_tokens=None, status=401, duration_ms=0.4)
    assert format_text(empty) == "2024-05-01T12:00:00.123Z req-1 - POST /v1/chat/completions 401 0.4 - - -"


def test_text_line_cannot_be_forged() -> None:
    line = format_text(record(path='/v1/x y\n2024-01-01T00:00:00.000Z fake "q"\\', key_id="a b"))
    assert "\n" not in line
    path = "/v1/x\\x20y\\x0a2024-01-01T00:00:00.000Z\\x20fake\\x20\\x22q\\x22\\x5c"
    assert line.split(" ")[2:5] == ["a\\x20b", "POST", path]


def test_json_line() -> None:
    assert json.loads(format_json(record())) == {
        "time": "2024-05-01T12:00:00.123Z", "request_id": "req-1", "key_id": "alice", "method": "POST",
        "path": "/v1/chat/completions", "status": 200, "duration_ms": 1234.6, "ttft_ms": 120.3,
        "prompt_tokens": 31, "completion_tokens": 8,
    }
    empty = json.loads(format_json(record(key_id=None, ttft_ms=None, prompt_tokens=None, completion_tokens=None)))
    assert empty["key_id"] is None and empty["ttft_ms"] is None and empty["completion_tokens"] is None


def test_query_strings_never_reach_the_log(tmp_path: Path) -> None:
    secret = "sk-live-0123456789abcdef"
    for fmt in ("text", "json"):
        log = AccessLog(tmp_path / fmt, fmt)
        log.write(record(path=f"/v1/models?api_key={secret}"))
        log.close()
        text = (tmp_path / fmt / "access.log").read_text()
        assert secret not in text and "api_key" not in text and "/v1/models" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_writes_one_line_per_record(tmp_path: Path, fmt: str) -> None:
    log_dir = tmp_path / "logs" / "llama"  # created when missing
    log = AccessLog(log_dir, fmt)
    for i in range(100):
        log.write(record(request_id=f"req-{i}"))
    log.close()
    written = lines(log_dir / "access.log")
    assert len(written) == 100
    if fmt == "json":
        assert [json.loads(line)["request_id"] for line in written] == [f"req-{i}" for i in range(100)]
    else:
        assert [line.split(" ")[1] for line in written] == [f"req-{i}" for i in range(100)]


def test_appends_to_an_existing_log(tmp_path: Path) -> None:
    for _ in range(2):
        log = AccessLog(tmp_path)
        log.write(record())
        log.close()
    assert len(lines(tmp_path / "access.log")) == 2


def test_rotates_at_the_size_cap(tmp_path: Path) -> None:
    size = len(format_text(record())) + 1
    log = AccessLog(tmp_path, "text", max_bytes=size * 10, backups=2)
    for i in range(45):
        log.write(record(request_id=f"r{i:04d}"))
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["access.log", "access.log.1", "access.log.2"]  # the oldest lines rotated out
    for name in files:
        assert (tmp_path / name).stat().st_size <= size * 10
    assert len(lines(tmp_path / "access.log")) == 5
    assert lines(tmp_path / "access.log.1")[0].split(" ")[1] == "r0030"
    assert lines(tmp_path / "access.log.2")[0].split(" ")[1] == "r0020"


def test_no_backups_starts_over(tmp_path: Path) -> None:
    size = len(format_text(record())) + 1
    log = AccessLog(tmp_path, "text", max_bytes=size * 3, backups=0)
    for _ in range(7):
        log.write(record())
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["access.log"]
    assert len(lines(tmp_path / "access.log")) == 1


def test_write_does_not_wait_for_the_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AccessLog(tmp_path)
    gate = threading.Event()
    real = log._file.write_lines
    stuck = threading.Event()

    def slow(batch: list[str]) -> None:
        stuck.set()
        gate.wait(10)  # the disk is stuck until the test lets it go
        real(batch)

    monkeypatch.setattr(log._file, "write_lines", slow)
    log.write(record())
    assert stuck.wait(5)  # the writer thread is now blocked on the disk
    start = time.perf_counter()
    for _ in range(1000):
        log.write(record())
    assert time.perf_counter() - start < 0.5
    gate.set()
    log.close()  # flushes what was queued
    assert len(lines(tmp_path / "access.log")) == 1001


def test_a_full_queue_drops_instead_of_growing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accesslog, "MAX_PENDING", 5)
    log = AccessLog(tmp_path)
    gate = threading.Event()
    real = log._file.write_lines
    monkeypatch.setattr(log._file, "write_lines", lambda batch: (gate.wait(10), real(batch)))
    for _ in range(50):
        log.write(record())
    assert log.dropped >= 40
    gate.set()
    log.close()
    assert len(lines(tmp_path / "access.log")) == 50 - log.dropped


def test_close_is_idempotent_and_later_writes_are_dropped(tmp_path: Path) -> None:
    log = AccessLog(tmp_path)
    log.write(record())
    log.close()
    log.close()
    log.write(record())
    assert log.dropped == 1
    assert len(lines(tmp_path / "access.log")) == 1
    assert not log._thread.is_alive()


def test_a_bad_record_costs_only_its_line(tmp_path: Path) -> None:
    log = AccessLog(tmp_path)
    log.write(record(request_id="ok-1"))
    log.write(record(duration_ms="not a number"))
    log.write(record(request_id="ok-2"))
    log.close()
    assert [line.split(" ")[1] for line in lines(tmp_path / "access.log")] == ["ok-1", "ok-2"]


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="xml"):
        AccessLog(tmp_path, "xml")
