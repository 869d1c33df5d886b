"""Migration from the old project's plaintext keys: `python -m gateway.keys import`, and the gateway's warnings."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import keys as cli
from gateway.auth import KeyRing, KeyStore, plaintext_keys
from gateway.keyfile import KeyEntry, ShortKeyError, decode, digest, parse_keys, parse_line

ROOT = Path(__file__).resolve().parents[2]
PROD = "sk-prod-4f9a1c0d2b7e8a6c5d3f"
PARTNER = "sk-partner-8c1d9e2f3a4b5c6d"
OPS = "some-long-plaintext-key"
TWICE_A = "sk-twice-a-0123456789abcdef"
TWICE_B = "sk-twice-b-0123456789abcdef"
LAST = "sk-last-line-0123456789abcdef"
HASHED = "sk-hashed-0123456789abcdef"
SHORT = "abc123"
OLD_KEYS = [PROD, PARTNER, OPS, TWICE_A, TWICE_B, LAST]

# The old project's file, and then some: CRLF and LF endings, a Latin-1 comment, a blank line, limits, expiries with
# colons and a timezone, an option, one id on two lines, a hashed line, a short key, a line that does not parse, and
# a last line without a newline.
OLD_FILE = (
    b"# owner: M\xfcller\r\n"
    + f"prod:{PROD}\r\n".encode()
    + f"partner:{PARTNER}:20:2027-01-01T10:00:00+02:00\n".encode()
    + b"\n"
    + f"ops:{OPS}::2030-01-01 10:00 admin=true\n".encode()
    + f"twice:{TWICE_A}:5\n".encode()
    + f"twice:{TWICE_B}:6\n".encode()
    + f"ci:sha256:{digest(HASHED).hex()}:100\n".encode()
    + f"short:{SHORT}:5\n".encode()
    + b"broken:sk-broken-0123456789abcdef:notanumber\n"
    + f"last:{LAST}:7".encode()
)
UNTOUCHED = {0, 3, 7, 8, 9}  # the indexes of the lines import keeps byte for byte


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("AUTH_KEYS_FILE", raising=False)
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("DATA_DIR", str(data))
    return data


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def same(a: KeyEntry, b: KeyEntry) -> bool:
    return (a.key_id, a.digest, a.rate_limit, a.expires, a.admin) == (b.key_id, b.digest, b.rate_limit, b.expires,
                                                                      b.admin)


def test_import_hashes_in_place_and_every_old_key_keeps_working(data: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = data / "api_keys.txt"
    keys_file.write_bytes(OLD_FILE)
    before = KeyRing(tuple(parse_keys(decode(OLD_FILE))))

    code, out, err = run(capsys, "import")

    assert code == 1  # a short key and a broken line are left for a person
    after_bytes = keys_file.read_bytes()
    after = KeyRing(tuple(parse_keys(decode(after_bytes))))
    assert len(after) == len(before) == 7
    for key in [*OLD_KEYS, HASHED]:
        old, new = before.match(key), after.match(key)
        assert old is not None and new is not None and same(old, new) and new.hashed, key
    assert after.match(SHORT) is None
    text = decode(after_bytes)
    for key in OLD_KEYS:
        assert key not in text and key not in out and key not in err
    old_lines = decode(OLD_FILE).splitlines(keepends=True)
    new_lines = text.splitlines(keepends=True)
    assert len(new_lines) == len(old_lines)
    for index, (old_line, new_line) in enumerate(zip(old_lines, new_lines, strict=True)):
        if index in UNTOUCHED:
            assert new_line == old_line
        else:  # hashed, keeping the id and the line ending
            assert new_line.partition(":")[0] == old_line.partition(":")[0]
            assert new_line.partition(":")[2].startswith("sha256:")
            assert new_line[len(new_line.rstrip("\r\n")):] == old_line[len(old_line.rstrip("\r\n")):]
    assert new_lines[4].endswith(" admin=true\n")
    assert "hashed key 'twice' in place (line 6, 7)" in err
    assert "imported 6 plaintext key(s)" in err
    assert "line 9: key 'short' is NOT hashed" in err and "shorter than 16" in err
    assert "remove --name short" in err and "generate --name short" in err
    assert "line 10 is left as it is: rate_limit is not a positive integer" in err
    assert SHORT not in err and "sk-broken" not in err
    assert out == ""  # stdout is for keys, and import makes none

    audit = [json.loads(line) for line in (data / "logs" / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [(r["action"], r["target"], r["result"]) for r in audit] == [
        ("key.import", "prod", "ok"), ("key.import", "partner", "ok"), ("key.import", "ops", "ok"),
        ("key.import", "twice", "ok"), ("key.import", "last", "ok"), ("key.import", "short", "refused"),
    ]
    assert audit[3]["details"]["lines"] == [6, 7]
    assert audit[5]["details"] == {"file": str(keys_file), "line": 9, "reason": "key shorter than 16 characters"}
    audit_text = (data / "logs" / "audit" / "audit.jsonl").read_text()
    for key in [*OLD_KEYS, SHORT, HASHED]:
        assert key not in audit_text and digest(key).hex() not in audit_text


def test_a_second_import_changes_nothing(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys_file = data / "api_keys.txt"
    keys_file.write_text(f"prod:{PROD}\npartner:{PARTNER}:20\n")
    assert run(capsys, "import")[0] == 0
    once = keys_file.read_bytes()
    stamp = keys_file.stat().st_mtime_ns, keys_file.stat().st_ino
    code, _, err = run(capsys, "import")
    assert code == 0 and "nothing to import" in err
    assert keys_file.read_bytes() == once
    assert (keys_file.stat().st_mtime_ns, keys_file.stat().st_ino) == stamp  # not even rewritten
    audit = (data / "logs" / "audit" / "audit.jsonl").read_text().splitlines()
    assert len(audit) == 2  # the first run's two keys; the second run imported nothing


def test_import_of_a_missing_file_is_an_error(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "import")
    assert code == 1 and "nothing to import" in err and "does not exist" in err
    assert not (data / "api_keys.txt").exists()


def test_import_as_a_subprocess_with_quiet(data: Path) -> None:
    keys_file = data / "keys.txt"
    keys_file.write_text(f"prod:{PROD}\n")
    keys_file.chmod(0o644)
    done = subprocess.run([sys.executable, "-m", "gateway.keys", "--file", str(keys_file), "import", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ})
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    (entry,) = parse_keys(keys_file.read_text())
    assert entry.hashed and entry.digest == digest(PROD)
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"


def test_a_short_plaintext_key_is_its_own_error() -> None:
    with pytest.raises(ShortKeyError):
        parse_line(f"short:{SHORT}")
    assert parse_line(f"ok:{PROD}").hashed is False


# ---------------------------------------------------------------- the gateway's warnings


def test_plaintext_keys_are_found_by_line_and_id() -> None:
    assert plaintext_keys(decode(OLD_FILE)) == [
        (2, "prod", False), (3, "partner", False), (5, "ops", False), (6, "twice", False), (7, "twice", False),
        (9, "short", True), (11, "last", False),
    ]


def test_the_gateway_warns_once_per_plaintext_key_and_louder_for_a_short_one(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    import asyncio

    keys_file = tmp_path / "api_keys.txt"
    keys_file.write_bytes(OLD_FILE)
    keys_file.chmod(0o600)
    store = KeyStore(keys_file)
    with caplog.at_level(logging.WARNING, logger="gateway.auth"):
        store.load()
        asyncio.run(store.reload(force=True))  # a reload says nothing new
        keys_file.write_bytes(OLD_FILE + b"\nnew:sk-new-plaintext-0123456789\n")
        asyncio.run(store.reload(force=True))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    plain = [m for m in messages if "is stored in plaintext" in m]
    refused = [m for m in messages if "is REFUSED" in m]
    assert [m.split(": key id ")[1].split()[0] for m in plain] == ["prod", "partner", "ops", "twice", "last", "new"]
    assert f"keys file {keys_file} line 2: key id prod is stored in plaintext: anyone who can read" in plain[0]
    assert plain[0].endswith(cli.command(keys_file, "import"))
    (short,) = refused
    assert "line 9: key id short is REFUSED: its plaintext key is shorter than 16 characters" in short
    assert "the old project accepted such keys" in short and "generate --name short" in short
    for key in [*OLD_KEYS, SHORT, "sk-new-plaintext-0123456789"]:
        assert key not in caplog.text and digest(key).hex() not in caplog.text


def test_hashed_keys_draw_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys_file = tmp_path / "api_keys.txt"
    keys_file.write_text(f"ci:sha256:{digest(HASHED).hex()}\n")
    keys_file.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        assert len(KeyStore(keys_file).load()) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
