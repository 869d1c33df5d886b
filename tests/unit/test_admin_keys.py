"""Admin keys: the `admin=true` option of the keys file, the CLI that writes it, and auth.require_admin."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.auth import Admitted, KeyRing, Refused, require_admin, verdict
from gateway.guard import Guard
from gateway.keyfile import HASH_MARK, KeyEntry, KeyLineError, digest, parse_keys, parse_line, split_options
from lifecycle.settings import Settings

PLAIN = "sk-plain-0123456789abcdef"
HEX = digest("sk-ops-0123456789abcdef").hex()


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("line", "admin", "rate", "expires"),
    [
        (f"ops:sha256:{HEX}:60 admin=true", True, 60, None),
        (f"ops:sha256:{HEX} admin=true", True, None, None),
        (f"ops:sha256:{HEX}:60 admin=false", False, 60, None),
        (f"ops:sha256:{HEX}::2030-01-01\tadmin=true", True, None, datetime(2030, 1, 1, tzinfo=UTC)),
        (f"ops:{PLAIN} admin=true", True, None, None),
        (f"ops:{PLAIN}:7:2030-01-01T10:00:00+02:00   admin=true", True, 7, datetime(2030, 1, 1, 8, tzinfo=UTC)),
        # an ISO expiration written with a space, which parse_expiry accepted before options existed
        (f"ops:{PLAIN}::2030-01-01 10:00 admin=true", True, None, datetime(2030, 1, 1, 10, tzinfo=UTC)),
        (f"ops:{PLAIN}::2030-01-01 10:00", False, None, datetime(2030, 1, 1, 10, tzinfo=UTC)),
        (f"ops:{PLAIN}:3", False, 3, None),
    ],
)
def test_options(line: str, admin: bool, rate: int | None, expires: datetime | None) -> None:
    entry = parse_line(line)
    assert (entry.key_id, entry.admin, entry.rate_limit, entry.expires) == ("ops", admin, rate, expires)
    assert entry.digest == (bytes.fromhex(HEX) if HASH_MARK in line else digest(PLAIN))
    assert parse_keys(f"  {line}  \n") == [entry]  # as the gateway reads the file


def test_split_options_takes_only_trailing_name_value_tokens() -> None:
    assert split_options("a:b::2030-01-01 10:00 admin=true") == ("a:b::2030-01-01 10:00", [("admin", "true")])
    assert split_options("a:b") == ("a:b", [])
    assert split_options("a:b=c") == ("a:b=c", [])  # the fields themselves are never an option
    assert split_options("a:b admin=true x y=1") == ("a:b admin=true x", [("y", "1")])
    assert split_options("a:b Admin=true") == ("a:b Admin=true", [])  # names are lowercase


@pytest.mark.parametrize(
    ("option", "reason"),
    [
        ("admn=true", "unknown option admn"),
        ("model=llama", "unknown option model"),  # a typo of models=: skipped, not silently ignored
        ("models=", "option models must be a comma-separated list without empty items"),
        ("models=a,,b", "option models must be a comma-separated list without empty items"),
        ("models=a|b", "option models holds a name with characters a model name cannot have"),
        ("routes=inference,admn", "option routes: unknown route group admn"),
        ("routes=admin admin=false", "option routes names admin but admin=false"),
        ("tokens_per_minute=0", "option tokens_per_minute must be a positive integer"),
        ("tokens_per_day=1e6", "option tokens_per_day must be a positive integer"),
        ("max_concurrent=-1", "option max_concurrent must be a positive integer"),
        ("tokens_per_day=5 tokens_per_day=6", "option tokens_per_day is given twice"),
        ("admin=yes", "option admin must be true or false"),
        ("admin=True", "option admin must be true or false"),
        ("admin=", "option admin must be true or false"),
        ("admin=true admin=false", "option admin is given twice"),
        ("admin=true junk=1", "unknown option junk"),
    ],
)
def test_a_bad_option_skips_the_line(option: str, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    text = f"# keys\nops:sha256:{HEX}:60 {option}\nplain:{PLAIN} {option}\nok:{PLAIN}0\n"
    with caplog.at_level(logging.WARNING):
        entries = parse_keys(text)
    assert [e.key_id for e in entries] == ["ok"]
    assert f"line 2 skipped: {reason}" in caplog.text and f"line 3 skipped: {reason}" in caplog.text
    assert HEX not in caplog.text and PLAIN not in caplog.text
    with pytest.raises(KeyLineError):
        parse_line(f"ops:{PLAIN} {option}")


def test_line_round_trip() -> None:
    expires = datetime(2031, 2, 3, 4, 5, 6, tzinfo=UTC)
    for entry in (
        KeyEntry("ops", digest(PLAIN), admin=True),
        KeyEntry("ops", digest(PLAIN), 60, admin=True),
        KeyEntry("ops", digest(PLAIN), None, expires, admin=True),
        KeyEntry("ops", digest(PLAIN), 5, expires, admin=True),
        KeyEntry("ops", digest(PLAIN), 5, expires),
    ):
        line = entry.line()
        assert parse_line(line) == entry
        assert line.endswith(" admin=true") == entry.admin
    assert KeyEntry("ops", bytes.fromhex(HEX), 60, admin=True).line() == f"ops:sha256:{HEX}:60 admin=true"
    assert KeyEntry("ops", bytes.fromhex(HEX), 60).line() == f"ops:sha256:{HEX}:60"  # no options: as before
    assert parse_line(f"ops:sha256:{HEX}:60 admin=false").line() == f"ops:sha256:{HEX}:60"


# ---------------------------------------------------------------- auth


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings.from_env({"DATA_DIR": str(tmp_path)}, probe_roots=[])


def test_admitted_carries_admin(settings: Settings) -> None:
    ring = KeyRing(tuple(parse_keys(f"ops:{PLAIN} admin=true\nuser:{PLAIN}x\n")))
    for consume in (True, False):
        ops = verdict(ring, Guard(settings), settings, f"Bearer {PLAIN}", "c", "/v1/models", consume=consume)
        user = verdict(ring, Guard(settings), settings, f"Bearer {PLAIN}x", "c", "/v1/models", consume=consume)
        assert isinstance(ops, Admitted) and ops.key_id == "ops" and ops.admin
        assert isinstance(user, Admitted) and user.key_id == "user" and not user.admin
        assert require_admin(ops) is None
        refused = require_admin(user)
        assert isinstance(refused, Refused)
        assert (refused.status, refused.code, refused.reason, refused.key_id) == (
            403, "admin_key_required", "auth", "user")
        assert refused.message == "this action needs an admin key"


def test_anonymous_is_never_admin(settings: Settings) -> None:
    off = Settings.from_env({"DATA_DIR": str(settings.data_dir), "AUTH_ENABLED": "false"}, probe_roots=[])
    result = verdict(KeyRing(), Guard(off), off, "", "127.0.0.1", "/admin/models/load")
    assert result == Admitted("anonymous", None) and isinstance(result, Admitted) and not result.admin
    refused = require_admin(result)
    assert isinstance(refused, Refused) and refused.status == 403 and refused.code == "admin_key_required"
    assert "AUTH_ENABLED=false" in refused.message
