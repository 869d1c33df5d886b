from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from gateway.auth import KeyRing, bearer_token
from gateway.keyfile import HASH_MARK, KeyEntry, digest, parse_expiry, parse_keys, parse_line


def ring(text: str) -> KeyRing:
    return KeyRing(tuple(parse_keys(text)))


def test_seed_format(caplog: pytest.LogCaptureFixture) -> None:
    text = (
        "# keys\n\nprod:sk-prod-abcdef0123456789\n"
        "limited:sk-lim-abcdef0123456789:10:2030-01-01\nshort:abc\nnocolon\n"
    )
    with caplog.at_level(logging.WARNING):
        keys = ring(text)
    assert len(keys) == 2
    prod = keys.match("sk-prod-abcdef0123456789")
    assert prod is not None and prod.key_id == "prod" and prod.rate_limit is None and prod.expires is None
    limited = keys.match("sk-lim-abcdef0123456789")
    assert limited is not None and limited.rate_limit == 10
    assert limited.expires == datetime(2030, 1, 1, tzinfo=UTC)
    assert keys.match("sk-nope") is None
    assert "line 5" in caplog.text and "line 6" in caplog.text
    assert "sk-" not in caplog.text and ":abc" not in caplog.text


def test_hashed_entries_never_look_like_plaintext() -> None:
    entry = KeyEntry("app", digest("sk-secret-0123456789abcdef"), 5, datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC))
    line = entry.line()
    assert line.startswith(f"app:{HASH_MARK}:") and "sk-secret" not in line
    parsed = parse_line(line)
    assert parsed == entry
    assert ring(line).match("sk-secret-0123456789abcdef") == entry
    # `sha256` is shorter than any valid plaintext key, so the two formats cannot be confused
    assert len(HASH_MARK) < 16


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-01", datetime(2030, 1, 1, tzinfo=UTC)),
        ("2030-01-01T10:00:00", datetime(2030, 1, 1, 10, tzinfo=UTC)),
        ("2030-01-01T10:00:00Z", datetime(2030, 1, 1, 10, tzinfo=UTC)),
        ("2030-01-01T12:00:00+02:00", datetime(2030, 1, 1, 10, tzinfo=UTC)),
    ],
)
def test_expiry_with_or_without_timezone(text: str, expected: datetime) -> None:
    assert parse_expiry(text) == expected
    entry = parse_line(f"k:sk-0123456789abcdefgh::{text}")
    assert entry.expires == expected
    assert entry.expired(expected) and not entry.expired(expected - timedelta(seconds=1))


@pytest.mark.parametrize(
    "line",
    ["k:sk-0123456789abcdefgh:x", "k:sk-0123456789abcdefgh:0", "k:sk-0123456789abcdefgh:5:soon",
     "k:sha256:abc", "bad id:sk-0123456789abcdefgh", ":sk-0123456789abcdefgh"],
)
def test_bad_lines_are_skipped(line: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert parse_keys(line) == []
    assert "line 1 skipped" in caplog.text
    assert "sk-0123456789" not in caplog.text


def test_bearer() -> None:
    assert bearer_token("Bearer sk-1") == "sk-1"
    assert bearer_token("bearer  sk-1 ") == "sk-1"
    assert bearer_token("sk-1") == "sk-1"
    assert bearer_token("") == ""


def test_many_keys_and_a_key_listed_twice() -> None:
    lines = [f"user{i}:sk-user-{i:06d}-abcdefghij" for i in range(1000)]
    keys = ring("\n".join([*lines, "again:sk-user-000007-abcdefghij"]))
    assert len(keys) == 1001
    for i in (0, 7, 999):
        found = keys.match(f"sk-user-{i:06d}-abcdefghij")
        assert found is not None and found.key_id == f"user{i}"  # the first line with a key wins
    assert keys.match("sk-user-001000-abcdefghij") is None
