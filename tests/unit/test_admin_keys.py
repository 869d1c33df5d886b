"""Admin keys: the `admin=true` option of the keys file, the CLI that writes it, and auth.require_admin."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway import keys as cli
from gateway.auth import Admitted, KeyRing, Refused, require_admin, verdict
from gateway.keyfile import HASH_MARK, KeyEntry, KeyLineError, digest, parse_keys, parse_line, split_options
from gateway.ratelimit import SlidingWindow
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
        ("models=llama", "unknown option models"),  # not known yet: skipped, not silently ignored
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
        ops = verdict(ring, SlidingWindow(), SlidingWindow(), settings, f"Bearer {PLAIN}", "c", consume=consume)
        user = verdict(ring, SlidingWindow(), SlidingWindow(), settings, f"Bearer {PLAIN}x", "c", consume=consume)
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
    result = verdict(KeyRing(), SlidingWindow(), SlidingWindow(), off, "", "127.0.0.1")
    assert result == Admitted("anonymous", None) and isinstance(result, Admitted) and not result.admin
    refused = require_admin(result)
    assert isinstance(refused, Refused) and refused.status == 403 and refused.code == "admin_key_required"
    assert "AUTH_ENABLED=false" in refused.message


# ---------------------------------------------------------------- the CLI


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AUTH_KEYS_FILE", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "api_keys.txt"


def run(capsys: pytest.CaptureFixture[str], path: Path, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--file", str(path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def only(path: Path) -> dict[str, KeyEntry]:
    return {e.key_id: e for e in parse_keys(path.read_text())}


def test_generate_admin(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    code, out, err = run(capsys, keys_file, "generate", "--name", "ops", "--admin", "--rate-limit", "9")
    assert code == 0 and "admin" in err
    key = out.strip()
    assert keys_file.read_text() == f"ops:sha256:{digest(key).hex()}:9 admin=true\n"
    code, out, _ = run(capsys, keys_file, "generate", "--name", "user")
    assert code == 0 and not only(keys_file)["user"].admin and only(keys_file)["ops"].admin


def test_update(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"# top\nlegacy:{PLAIN}:3\nother:{PLAIN}0 admin=true\n")
    code, out, err = run(capsys, keys_file, "update", "--name", "legacy", "--admin")
    assert code == 0 and out == "" and "updated key 'legacy'" in err and PLAIN not in err
    lines = keys_file.read_text().splitlines()
    # rewritten in place, hashed, the same key: a plaintext key keeps working
    assert lines == ["# top", f"legacy:sha256:{digest(PLAIN).hex()}:3 admin=true", f"other:{PLAIN}0 admin=true"]
    code, _, _ = run(capsys, keys_file, "update", "--name", "legacy", "--no-admin", "--rate-limit", "50",
                     "--expires", "2999-01-01")
    assert code == 0
    entry = only(keys_file)["legacy"]
    assert (entry.admin, entry.rate_limit, entry.expires, entry.digest) == (
        False, 50, datetime(2999, 1, 1, tzinfo=UTC), digest(PLAIN))
    assert keys_file.read_text().splitlines()[1] == f"legacy:sha256:{digest(PLAIN).hex()}:50:2999-01-01T00:00:00+00:00"
    code, _, _ = run(capsys, keys_file, "update", "--name", "legacy", "--rate-limit", "7")
    assert code == 0 and only(keys_file)["legacy"].expires == datetime(2999, 1, 1, tzinfo=UTC)  # the rest is kept


def test_update_every_line_of_the_id(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"ops:{PLAIN} admin=true\nops:{PLAIN}0 admin=true\nops:bad line admin=true\n")
    code, _, err = run(capsys, keys_file, "update", "--name", "ops", "--no-admin")
    assert code == 0 and "2 lines" in err
    assert [e.admin for e in parse_keys(keys_file.read_text())] == [False, False]
    assert keys_file.read_text().splitlines()[2] == "ops:bad line admin=true"  # an invalid line is kept as it was


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["update", "--name", "ops"], 2, "at least one of"),
        (["update", "--name", "ops", "--admin", "--no-admin"], 2, "not allowed with"),
        (["update", "--name", "ops", "--rate-limit", "0"], 2, "positive integer"),
        (["update", "--name", "ops", "--expires", "2000-01-01"], 2, "in the past"),
        (["update", "--name", "nobody", "--admin"], 1, "unknown key id 'nobody'"),
        (["update", "--name", "broken", "--admin"], 1, "no valid line"),
    ],
)
def test_update_errors(capsys: pytest.CaptureFixture[str], keys_file: Path, argv: list[str], code: int,
                       message: str) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"ops:{PLAIN}\nbroken:short\n")
    before = keys_file.read_bytes()
    result, out, err = run(capsys, keys_file, *argv)
    assert (result, out) == (code, "") and message in err
    assert keys_file.read_bytes() == before


def test_rotate_keeps_admin(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"ops:{PLAIN}:4 admin=true\n")
    code, out, _ = run(capsys, keys_file, "rotate", "--name", "ops")
    assert code == 0
    entry = only(keys_file)["ops"]
    assert entry.admin and entry.rate_limit == 4 and entry.hashed and entry.digest == digest(out.strip())


def test_list_shows_admin(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"ops:sha256:{HEX} admin=true\nlegacy:{PLAIN} admin=true\nuser:{PLAIN}0\n")
    code, out, err = run(capsys, keys_file, "list")
    assert code == 0 and err == ""
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["ops"] == ["ops", "default", "never", "active", "admin"]
    assert rows["legacy"] == ["legacy", "default", "never", "active", "admin", "(plaintext)"]
    assert rows["user"] == ["user", "default", "never", "active", "(plaintext)"]
    assert HEX not in out and PLAIN not in out
