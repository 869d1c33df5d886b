"""The keys file when it is odd: bytes that are not UTF-8, read errors, loose permissions (KeyStore, in process)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import auth
from gateway import keys as cli
from gateway.app import create_app, reload_keys
from gateway.audit import AuditLog
from gateway.auth import KeyStore
from gateway.keyfile import decode, digest, parse_keys, read_text
from gateway.pipeline import Exchange
from gateway.state import AUDIT, EXCHANGE, KEYS
from lifecycle.settings import Settings
from lifecycle.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]
PLAIN = "sk-plain-0123456789abcdef"
HASHED = "sk-hashed-0123456789abcdef"
LATIN1 = b"# owner: M\xfcller\n"  # a Latin-1 comment: not UTF-8


def secrets_of(path: Path) -> list[str]:
    """Every string that must never appear in a log: the plaintext keys and the stored hashes."""
    return [PLAIN, HASHED, digest(HASHED).hex(), *(e.digest.hex() for e in parse_keys(read_text(path)))]


def write_keys(path: Path, mode: int = 0o600) -> Path:
    path.write_bytes(LATIN1 + f"plain:{PLAIN}\n".encode() + f"hashed:sha256:{digest(HASHED).hex()}\n".encode())
    path.chmod(mode)
    return path


def assert_no_secret(text: str, path: Path) -> None:
    for secret in secrets_of(path):
        assert secret not in text


def test_a_comment_that_is_not_utf8_loads_and_the_keys_work(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_keys(tmp_path / "api_keys.txt")
    store = KeyStore(path)
    with caplog.at_level(logging.DEBUG):
        ring = store.load()
    assert len(ring) == 2 and store.problem is None
    assert ring.match(PLAIN) is not None and ring.match(HASHED) is not None
    assert "UnicodeDecodeError" not in caplog.text
    assert_no_secret(caplog.text, path)


def test_cli_remove_in_a_non_utf8_file_revokes_the_key_in_the_gateway(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The old gateway failed to decode the file the CLI had just written and kept the old ring: fail open."""
    path = write_keys(tmp_path / "api_keys.txt")
    store = KeyStore(path)
    store.load()
    assert cli.main(["--file", str(path), "remove", "--name", "plain"]) == 0
    capsys.readouterr()
    assert asyncio.run(store.reload())  # the watcher's check: the file changed
    assert store.ring.match(PLAIN) is None and store.ring.match(HASHED) is not None
    assert path.read_bytes().startswith(LATIN1)  # the comment kept byte for byte


def test_the_cli_and_the_gateway_read_the_same_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "api_keys.txt"
    path.write_bytes(b"# \xff\xfe\x80 odd bytes\nweird\xe9id:" + PLAIN.encode() + b"\nok:" + PLAIN.encode()[::-1]
                     + b"\n")
    store = KeyStore(path)
    ring = store.load()
    assert [e.key_id for e in ring.entries] == ["ok"]  # a key id with a stray byte is a bad line, for both
    assert cli.main(["--file", str(path), "--quiet", "list"]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()] == ["ok"] and "line 2 skipped" in err
    assert cli.KeysFile.read(path).text() == read_text(path) == decode(path.read_bytes())


def test_digest_of_surrogate_escaped_text_is_the_digest_of_the_bytes_sent() -> None:
    """aiohttp hands a header byte that is not UTF-8 over as a lone surrogate; the old digest() raised on it."""
    raw = b"sk-\xff\xfe-0123456789abcdef"
    assert digest(raw.decode("utf-8", "surrogateescape")) == hashlib.sha256(raw).digest()
    assert digest("sk-\ud800-not-from-any-bytes") == hashlib.sha256("sk-\ud800-not-from-any-bytes".encode(
        "utf-8", "surrogatepass")).digest()
    assert digest("sk-M\u00fcller-0123456789") == hashlib.sha256("sk-M\u00fcller-0123456789".encode()).digest()


def test_a_file_that_cannot_be_read_fails_closed_without_its_content(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_keys(tmp_path / "api_keys.txt")
    store = KeyStore(path)
    store.load()
    assert store.ring
    caplog.clear()  # (the load's warning about the plaintext key)

    def broken(p: Path) -> str:  # what the old code met: an error whose text quotes the whole file
        raise UnicodeDecodeError("utf-8", p.read_bytes(), 10, 11, "invalid start byte")

    monkeypatch.setattr(auth, "read_text", broken)
    with caplog.at_level(logging.DEBUG):
        assert asyncio.run(store.reload(force=True))
    assert len(store.ring) == 0  # fail closed, not the last good ring
    assert store.problem == "cannot read the keys file (UnicodeDecodeError)"
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert str(path) in warning.getMessage() and "UnicodeDecodeError" in warning.getMessage()
    assert warning.exc_info is None
    assert_no_secret(caplog.text, path)


def test_a_directory_in_place_of_the_file_fails_closed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "api_keys.txt"
    path.mkdir()
    with caplog.at_level(logging.WARNING):
        assert len(KeyStore(path).load()) == 0
    assert f"cannot read keys file {path} (IsADirectoryError" in caplog.text


def test_a_fixed_file_is_picked_up_even_if_only_its_mode_changed(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The old stamp (mtime, size, inode) missed a chmod, and was recorded before a read that then failed."""
    path = write_keys(tmp_path / "api_keys.txt", 0o600)
    real = auth.read_text

    def denied(p: Path) -> str:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(auth, "read_text", denied)
    store = KeyStore(path)
    with caplog.at_level(logging.WARNING):
        assert len(store.load()) == 0
        assert not asyncio.run(store.reload())  # unchanged: no re-read, no second warning every second
    assert caplog.text.count("cannot read keys file") == 1
    assert "PermissionError: Permission denied" in caplog.text
    monkeypatch.setattr(auth, "read_text", real)
    path.chmod(0o400)  # the fix: only the ctime changes
    assert asyncio.run(store.reload())
    assert len(store.ring) == 2 and store.problem is None


def test_reload_never_raises_and_logs_no_exception_text(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_keys(tmp_path / "api_keys.txt")
    store = KeyStore(path)
    store.load()

    def bug(force: bool) -> None:
        raise RuntimeError(f"text that quotes {PLAIN}")

    monkeypatch.setattr(store, "_read", bug)
    with caplog.at_level(logging.DEBUG):
        assert asyncio.run(store.reload(force=True)) is False
    assert "RuntimeError" in caplog.text
    assert PLAIN not in caplog.text and all(r.exc_info is None for r in caplog.records)


def test_the_watcher_keeps_going_and_logs_no_exception_text(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_keys(tmp_path / "api_keys.txt")
    store = KeyStore(path)
    calls: list[bool] = []

    def flaky(force: bool) -> None:
        calls.append(force)
        raise RuntimeError(f"text that quotes {PLAIN}")

    monkeypatch.setattr(store, "_read", flaky)

    async def run() -> None:
        task = asyncio.create_task(store.watch(0.01))
        while len(calls) < 3:
            await asyncio.sleep(0.01)
            assert not task.done()
        task.cancel()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(run())
    assert PLAIN not in caplog.text and all(r.exc_info is None for r in caplog.records)


def test_reload_endpoint_answers_200_with_a_warning_when_the_file_is_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_keys(tmp_path / "api_keys.txt")
    store = KeyStore(path)
    store.load()
    audit = AuditLog(tmp_path / "audit")

    class Request(dict):  # type: ignore[type-arg]
        app = {KEYS: store, AUDIT: audit}
        remote = "127.0.0.1"

        def __init__(self) -> None:
            super().__init__({EXCHANGE: Exchange(0.0, "POST", "/reload", "r-1", key_id="hashed")})

    def broken(p: Path) -> str:
        raise UnicodeDecodeError("utf-8", p.read_bytes(), 10, 11, "invalid start byte")

    monkeypatch.setattr(auth, "read_text", broken)
    resp = asyncio.run(reload_keys(Request()))  # type: ignore[arg-type]
    assert resp.status == 200
    assert resp.text is not None
    assert '"keys": 0' in resp.text and "UnicodeDecodeError" in resp.text
    assert_no_secret(resp.text, path)
    monkeypatch.undo()
    resp = asyncio.run(reload_keys(Request()))  # type: ignore[arg-type]
    assert resp.status == 200 and resp.text == '{"status": "reloaded", "keys": 2}'
    audit.close()
    text = audit.path.read_text()
    assert_no_secret(text, path)
    failed, ok = (json.loads(line) for line in text.splitlines())
    assert (failed["who"], failed["action"], failed["from"], failed["result"]) == ("hashed", "keys.reload",
                                                                                   "127.0.0.1", "failed")
    assert failed["details"] == {"file": str(path), "keys": 0,
                                 "problem": "cannot read the keys file (UnicodeDecodeError)"}
    assert ok["result"] == "ok" and ok["details"] == {"file": str(path), "keys": 2}


# --- permissions -------------------------------------------------------------------------------------------------


def mode_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "chmod 600" in r.getMessage()]


def test_a_file_others_may_read_is_warned_about_once_per_mode(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = write_keys(tmp_path / "api_keys.txt", 0o644)
    store = KeyStore(path)
    with caplog.at_level(logging.WARNING):
        store.load()
        asyncio.run(store.reload(force=True))
        asyncio.run(store.reload(force=True))
    assert mode_warnings(caplog) == [
        f"keys file {path} has mode 0644: other users can read or change it; restrict it with: chmod 600 {path}"
    ]
    caplog.clear()
    path.chmod(0o640)
    with caplog.at_level(logging.WARNING):
        asyncio.run(store.reload())
        asyncio.run(store.reload(force=True))
    assert len(mode_warnings(caplog)) == 1 and "mode 0640" in mode_warnings(caplog)[0]
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        asyncio.run(store.reload(force=True))
        path.chmod(0o400)
        asyncio.run(store.reload(force=True))
    assert mode_warnings(caplog) == []


# --- the start-up hint -------------------------------------------------------------------------------------------


def start_up_warning(settings: Settings, caplog: pytest.LogCaptureFixture) -> str:
    with caplog.at_level(logging.WARNING, logger="gateway"):
        create_app(settings, Supervisor(settings))
    (message,) = [r.getMessage() for r in caplog.records if "no API keys were loaded" in r.getMessage()]
    return message.split("Create one with: ", 1)[1].removesuffix(" (or set AUTH_ENABLED=false for local tests)")


def test_start_up_hint_names_the_real_file_and_works_as_written(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Under `make serve` (DATA_DIR=./data) the old hint sent the CLI to /data/api_keys.txt."""
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"DATA_DIR": "./data", "AUTH_ENABLED": "true"}, probe_roots=[])
    hint = start_up_warning(settings, caplog)
    target = tmp_path / "data" / "api_keys.txt"
    assert f"--file {target} generate --name my-app" in hint
    # Run it as a user would paste it: another folder, a shell without DATA_DIR or AUTH_KEYS_FILE.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "AUTH_KEYS_FILE")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(shlex.split(hint), cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (entry,) = parse_keys(target.read_text())
    assert entry.key_id == "my-app" and entry.digest == digest(done.stdout.strip())


def test_start_up_hint_leaves_out_the_default_file(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_ENABLED": "true"}, probe_roots=[])
    monkeypatch.setattr(cli, "default_file", lambda: tmp_path / "api_keys.txt")
    hint = start_up_warning(settings, caplog)
    assert hint == shlex.join([sys.executable, "-m", "gateway.keys", "generate", "--name", "my-app"])
    assert cli.command(Path("/srv/my keys.txt"), "list").endswith("--file '/srv/my keys.txt' list")
