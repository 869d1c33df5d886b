"""`python -m gateway.keys`: the key-management CLI, in-process through main() and as real subprocesses."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway import keys as cli
from gateway.keyfile import KeyEntry, digest, parse_keys

ROOT = Path(__file__).resolve().parents[2]
PLAIN_KEY = "sk-plaintext-abcdef0123456789"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AUTH_KEYS_FILE", raising=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()  # the gateway's DATA_DIR exists: the CLI writes its audit lines under it


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "api_keys.txt"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def entries(path: Path) -> dict[str, KeyEntry]:
    return {e.key_id: e for e in parse_keys(path.read_text())}


def generate(capsys: pytest.CaptureFixture[str], path: Path, name: str, *extra: str) -> str:
    code, out, _ = run(capsys, "--file", str(path), "generate", "--name", name, *extra)
    assert code == 0
    return out.strip()


def test_generate_stores_only_the_hash(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    code, out, err = run(capsys, "--file", str(keys_file), "generate", "--name", "alice")
    assert code == 0
    key = out.strip()
    assert out == key + "\n"  # the key alone on stdout, once
    assert key.startswith("sk-") and len(key) >= 40
    assert key not in err and key not in keys_file.read_text()
    (entry,) = parse_keys(keys_file.read_text())
    assert entry.key_id == "alice" and entry.hashed
    assert entry.digest == digest(key)
    assert entry.rate_limit is None and entry.expires is None
    assert keys_file.read_text() == f"alice:sha256:{digest(key).hex()}\n"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert "alice" in err  # a note on stderr


def test_keys_are_random(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    assert generate(capsys, keys_file, "a") != generate(capsys, keys_file, "b")


def test_generate_with_rate_limit(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    key = generate(capsys, keys_file, "bob", "--rate-limit", "7")
    entry = entries(keys_file)["bob"]
    assert entry.rate_limit == 7 and entry.digest == digest(key)


def test_mode_is_0600_even_if_the_file_was_not(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text("# shared\n")
    keys_file.chmod(0o644)
    generate(capsys, keys_file, "a")
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert not [p.name for p in keys_file.parent.iterdir() if p.name.endswith(".tmp")]


def test_duplicate_generate_fails(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    generate(capsys, keys_file, "alice")
    before = keys_file.read_text()
    code, out, err = run(capsys, "--file", str(keys_file), "generate", "--name", "alice")
    assert code == 1
    assert out == ""
    assert "already exists" in err and "alice" in err
    assert keys_file.read_text() == before


def test_duplicate_of_a_plaintext_id_fails(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"old:{PLAIN_KEY}\n")
    code, _, err = run(capsys, "--file", str(keys_file), "generate", "--name", "old")
    assert code == 1 and "already exists" in err
    assert PLAIN_KEY not in err


def test_list(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    key_a = generate(capsys, keys_file, "alice", "--rate-limit", "5", "--expires", "2999-01-01")
    key_b = generate(capsys, keys_file, "bob")
    with keys_file.open("a") as handle:
        handle.write(f"legacy:{PLAIN_KEY}:9\n")
        handle.write(f"gone:sha256:{digest('sk-gone-0123456789abcdef').hex()}::2020-01-01\n")
    code, out, err = run(capsys, "--file", str(keys_file), "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "RATE", "LIMIT", "EXPIRES", "STATUS"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["alice"] == ["alice", "5", "2999-01-01T00:00:00+00:00", "active"]
    assert rows["bob"] == ["bob", "default", "never", "active"]
    assert rows["legacy"] == ["legacy", "9", "never", "active", "(plaintext)"]
    assert rows["gone"] == ["gone", "default", "2020-01-01T00:00:00+00:00", "expired"]
    text = out + err
    for secret in (key_a, key_b, PLAIN_KEY):
        assert secret not in text
    for entry in parse_keys(keys_file.read_text()):
        assert entry.digest.hex() not in text
    assert "sha256" not in text


def test_list_warns_about_bad_lines_without_showing_them(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text("# c\nshort:sk-tooshort\nok:sk-ok-0123456789abcdef\n")
    code, out, err = run(capsys, "--file", str(keys_file), "list")
    assert code == 0
    assert "line 2" in err and "sk-tooshort" not in err + out
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["ok"]


def test_list_missing_or_empty_file(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    code, out, err = run(capsys, "--file", str(keys_file), "list")
    assert (code, out) == (0, "") and "does not exist" in err
    assert not keys_file.exists()
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text("# nothing yet\n")
    code, out, err = run(capsys, "--file", str(keys_file), "list")
    assert (code, out) == (0, "") and "no keys" in err


def test_rotate_changes_the_key_and_keeps_limit_and_expiry(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    old_key = generate(capsys, keys_file, "alice", "--rate-limit", "12", "--expires", "2999-06-01T10:00:00+02:00")
    generate(capsys, keys_file, "bob")
    before = entries(keys_file)
    code, out, err = run(capsys, "--file", str(keys_file), "rotate", "--name", "alice")
    assert code == 0
    new_key = out.strip()
    assert out == new_key + "\n" and new_key != old_key and new_key.startswith("sk-")
    after = entries(keys_file)
    assert after["alice"].digest == digest(new_key) != before["alice"].digest
    assert after["alice"].rate_limit == 12
    assert after["alice"].expires == before["alice"].expires == datetime(2999, 6, 1, 8, tzinfo=UTC)
    assert after["bob"] == before["bob"]
    assert keys_file.read_text().splitlines()[0].startswith("alice:")  # same place in the file
    assert old_key not in err and new_key not in err


def test_rotate_replaces_a_plaintext_entry_and_every_duplicate(
    capsys: pytest.CaptureFixture[str], keys_file: Path
) -> None:
    keys_file.parent.mkdir(parents=True)
    other = "sk-second-0123456789abcdef"
    keys_file.write_text(f"# top\nlegacy:{PLAIN_KEY}:3:2999-01-01\nkeep:{other}\nlegacy:sk-dup-0123456789abcdef\n")
    code, out, _ = run(capsys, "--file", str(keys_file), "rotate", "--name", "legacy")
    assert code == 0
    text = keys_file.read_text()
    assert PLAIN_KEY not in text and "sk-dup" not in text  # no old key left working
    lines = text.splitlines()
    assert lines[0] == "# top" and lines[2] == f"keep:{other}" and len(lines) == 3
    entry = entries(keys_file)["legacy"]
    assert entry.hashed and entry.digest == digest(out.strip())
    assert entry.rate_limit == 3 and entry.expires == datetime(2999, 1, 1, tzinfo=UTC)


def test_rotate_an_expired_key_warns(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"old:{PLAIN_KEY}::2020-01-01\n")
    code, _, err = run(capsys, "--file", str(keys_file), "rotate", "--name", "old")
    assert code == 0 and "expired" in err


def test_remove(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    generate(capsys, keys_file, "alice")
    generate(capsys, keys_file, "bob")
    code, out, err = run(capsys, "--file", str(keys_file), "remove", "--name", "alice")
    assert code == 0 and out == "" and "alice" in err
    assert set(entries(keys_file)) == {"bob"}
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


@pytest.mark.parametrize("command", ["rotate", "remove"])
def test_unknown_id_fails(capsys: pytest.CaptureFixture[str], keys_file: Path, command: str) -> None:
    generate(capsys, keys_file, "alice")
    before = keys_file.read_text()
    code, out, err = run(capsys, "--file", str(keys_file), command, "--name", "nobody")
    assert code == 1 and out == ""
    assert "unknown key id 'nobody'" in err
    assert keys_file.read_text() == before


@pytest.mark.parametrize("command", ["rotate", "remove"])
def test_unknown_id_in_a_missing_file(capsys: pytest.CaptureFixture[str], keys_file: Path, command: str) -> None:
    code, _, err = run(capsys, "--file", str(keys_file), command, "--name", "nobody")
    assert code == 1 and "unknown key id" in err
    assert not keys_file.parent.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--file", "{f}", "generate", "--name", "a", "--quiet"],
        ["--file", "{f}", "--quiet", "generate", "--name", "a"],
        ["--quiet", "generate", "--name", "a", "--file", "{f}"],
        ["generate", "--file", "{f}", "--name", "a", "-q"],
    ],
)
def test_file_and_quiet_before_and_after(capsys: pytest.CaptureFixture[str], keys_file: Path, argv: list[str]) -> None:
    code, out, err = run(capsys, *[a.format(f=keys_file) for a in argv])
    assert code == 0 and err == ""
    assert entries(keys_file)["a"].digest == digest(out.strip())
    assert out == out.strip() + "\n"


def test_quiet_on_other_commands(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    generate(capsys, keys_file, "a")
    code, out, err = run(capsys, "rotate", "--name", "a", "--file", str(keys_file), "--quiet")
    assert code == 0 and err == "" and entries(keys_file)["a"].digest == digest(out.strip())
    assert run(capsys, "--quiet", "remove", "--file", str(keys_file), "--name", "a") == (0, "", "")
    assert run(capsys, "--file", str(keys_file), "list", "--quiet") == (0, "", "")


def test_file_after_the_subcommand_wins_over_none_before(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    first, second = tmp_path / "one.txt", tmp_path / "two.txt"
    code, _, _ = run(capsys, "--file", str(first), "generate", "--name", "a", "--file", str(second))
    assert code == 0 and second.exists() and not first.exists()


def test_default_file_from_data_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "generate", "--name", "a")
    assert code == 0
    assert entries(tmp_path / "data" / "api_keys.txt")["a"].digest == digest(out.strip())


def test_default_file_from_auth_keys_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "elsewhere" / "keys"
    monkeypatch.setenv("AUTH_KEYS_FILE", str(target))
    monkeypatch.setenv("PORT", "not-a-port")  # the settings are not needed when AUTH_KEYS_FILE is set
    code, out, _ = run(capsys, "generate", "--name", "a")
    assert code == 0 and entries(target)["a"].digest == digest(out.strip())


def test_bad_settings_are_a_usage_error(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "not-a-port")
    code, out, err = run(capsys, "list")
    assert code == 2 and out == "" and "PORT" in err


@pytest.mark.parametrize(
    ("value", "delta"),
    [("30d", timedelta(days=30)), ("24h", timedelta(hours=24)), ("60m", timedelta(minutes=60))],
)
def test_expires_relative(capsys: pytest.CaptureFixture[str], keys_file: Path, value: str, delta: timedelta) -> None:
    start = datetime.now(UTC)
    generate(capsys, keys_file, "a", "--expires", value)
    expires = entries(keys_file)["a"].expires
    assert expires is not None
    assert start + delta - timedelta(seconds=2) <= expires <= datetime.now(UTC) + delta


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2999-01-31", datetime(2999, 1, 31, tzinfo=UTC)),
        ("2999-01-31T12:30:00", datetime(2999, 1, 31, 12, 30, tzinfo=UTC)),
        ("2999-01-31T12:30:00Z", datetime(2999, 1, 31, 12, 30, tzinfo=UTC)),
        ("2999-01-31T12:30:00+02:00", datetime(2999, 1, 31, 10, 30, tzinfo=UTC)),
    ],
)
def test_expires_iso(capsys: pytest.CaptureFixture[str], keys_file: Path, value: str, expected: datetime) -> None:
    generate(capsys, keys_file, "a", "--expires", value)
    assert entries(keys_file)["a"].expires == expected


@pytest.mark.parametrize("value", ["30x", "soon", "0d", "-5d", "2999-13-01", "2001-01-01", ""])
def test_bad_expires_is_a_usage_error(capsys: pytest.CaptureFixture[str], keys_file: Path, value: str) -> None:
    code, out, err = run(capsys, "--file", str(keys_file), "generate", "--name", "a", "--expires", value)
    assert code == 2 and out == ""
    assert "--expires" in err
    assert not keys_file.exists()


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["generate"],
        ["generate", "--name", "bad name"],
        ["generate", "--name", "a:b"],
        ["generate", "--name", "a", "--rate-limit", "0"],
        ["generate", "--name", "a", "--rate-limit", "many"],
        ["rotate"],
        ["remove", "--name", ""],
    ],
)
def test_usage_errors(capsys: pytest.CaptureFixture[str], keys_file: Path, argv: list[str]) -> None:
    code, out, err = run(capsys, "--file", str(keys_file), *argv)
    assert code == 2 and out == "" and "usage:" in err
    assert not keys_file.exists()


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "generate" in out and "rotate" in out


def test_other_lines_are_kept_exactly(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    original = (
        b"# API keys\r\n"
        b"\r\n"
        b"  # indented comment \xff not utf-8\r\n"
        + f"legacy:{PLAIN_KEY}:10\r\n".encode()
        + b"this line is invalid\r\n"
        + b"short:abc\r\n"
        + b"\tspaced:sk-spaced-0123456789abcdef  \r\n"
        + b"# last, no newline"
    )
    keys_file.write_bytes(original)
    generate(capsys, keys_file, "new")
    data = keys_file.read_bytes()
    assert data.startswith(original + b"\r\n")
    assert data.endswith(b"\r\n") and data.count(b"new:sha256:") == 1
    run(capsys, "--file", str(keys_file), "rotate", "--name", "new")
    assert keys_file.read_bytes().startswith(original + b"\r\n")
    assert run(capsys, "--file", str(keys_file), "remove", "--name", "new")[0] == 0
    assert keys_file.read_bytes() == original + b"\r\n"
    assert run(capsys, "--file", str(keys_file), "remove", "--name", "spaced")[0] == 0
    assert keys_file.read_bytes() == original.replace(b"\tspaced:sk-spaced-0123456789abcdef  \r\n", b"") + b"\r\n"
    assert PLAIN_KEY.encode() in keys_file.read_bytes()


def test_writes_through_a_symlink(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_text("# real\n")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    generate(capsys, link, "a")
    assert link.is_symlink() and "a" in entries(real)


def test_unreadable_file_is_an_operational_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "is-a-dir"
    folder.mkdir()
    code, out, err = run(capsys, "--file", str(folder), "list")
    assert code == 1 and out == "" and "cannot read" in err


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("AUTH_KEYS_FILE", "PYTHONPATH")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_subprocess_round_trip(keys_file: Path) -> None:
    def call(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway.keys", *argv],
            cwd=ROOT,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = call("generate", "--name", "svc", "--file", str(keys_file), "--quiet", "--rate-limit", "3")
    assert made.returncode == 0 and made.stderr == ""
    key = made.stdout.strip()
    assert entries(keys_file)["svc"].digest == digest(key)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    listed = call("--file", str(keys_file), "list")
    assert listed.returncode == 0 and "svc" in listed.stdout and key not in listed.stdout + listed.stderr
    missing = call("--file", str(keys_file), "remove", "--name", "ghost")
    assert missing.returncode == 1 and "unknown key id" in missing.stderr
    bad = call("--file", str(keys_file), "generate", "--name", "x", "--expires", "later")
    assert bad.returncode == 2


def test_concurrent_generates_lose_no_key(keys_file: Path) -> None:
    names = [f"worker-{n}" for n in range(16)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gateway.keys", "--file", str(keys_file), "generate", "--name", name, "--quiet"],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    printed = {}
    for name, proc in zip(names, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        printed[name] = out.strip()
    stored = entries(keys_file)
    assert set(stored) == set(names)
    assert len(parse_keys(keys_file.read_text())) == len(names)
    for name, key in printed.items():
        assert stored[name].digest == digest(key)
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600


# ---------------------------------------------------------------- admin keys (admin=true)

PLAIN = "sk-plain-0123456789abcdef"
HEX = digest("sk-ops-0123456789abcdef").hex()


def run_on(capsys: pytest.CaptureFixture[str], path: Path, *argv: str) -> tuple[int, str, str]:
    return run(capsys, "--file", str(path), *argv)


def test_generate_admin(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    code, out, err = run_on(capsys, keys_file, "generate", "--name", "ops", "--admin", "--rate-limit", "9")
    assert code == 0 and "admin" in err
    key = out.strip()
    assert keys_file.read_text() == f"ops:sha256:{digest(key).hex()}:9 admin=true\n"
    code, out, _ = run_on(capsys, keys_file, "generate", "--name", "user")
    assert code == 0 and not entries(keys_file)["user"].admin and entries(keys_file)["ops"].admin


def test_update(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"# top\nlegacy:{PLAIN}:3\nother:{PLAIN}0 admin=true\n")
    code, out, err = run_on(capsys, keys_file, "update", "--name", "legacy", "--admin")
    assert code == 0 and out == "" and "updated key 'legacy'" in err and PLAIN not in err
    lines = keys_file.read_text().splitlines()
    # rewritten in place, hashed, the same key: a plaintext key keeps working
    assert lines == ["# top", f"legacy:sha256:{digest(PLAIN).hex()}:3 admin=true", f"other:{PLAIN}0 admin=true"]
    code, _, _ = run_on(capsys, keys_file, "update", "--name", "legacy", "--no-admin", "--rate-limit", "50",
                     "--expires", "2999-01-01")
    assert code == 0
    entry = entries(keys_file)["legacy"]
    assert (entry.admin, entry.rate_limit, entry.expires, entry.digest) == (
        False, 50, datetime(2999, 1, 1, tzinfo=UTC), digest(PLAIN))
    assert keys_file.read_text().splitlines()[1] == f"legacy:sha256:{digest(PLAIN).hex()}:50:2999-01-01T00:00:00+00:00"
    code, _, _ = run_on(capsys, keys_file, "update", "--name", "legacy", "--rate-limit", "7")
    assert code == 0 and entries(keys_file)["legacy"].expires == datetime(2999, 1, 1, tzinfo=UTC)  # the rest is kept


def test_update_every_line_of_the_id(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"ops:{PLAIN} admin=true\nops:{PLAIN}0 admin=true\nops:bad line admin=true\n")
    code, _, err = run_on(capsys, keys_file, "update", "--name", "ops", "--no-admin")
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
    result, out, err = run_on(capsys, keys_file, *argv)
    assert (result, out) == (code, "") and message in err
    assert keys_file.read_bytes() == before


def test_rotate_keeps_admin(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"ops:{PLAIN}:4 admin=true\n")
    code, out, _ = run_on(capsys, keys_file, "rotate", "--name", "ops")
    assert code == 0
    entry = entries(keys_file)["ops"]
    assert entry.admin and entry.rate_limit == 4 and entry.hashed and entry.digest == digest(out.strip())


def test_list_shows_admin(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    keys_file.parent.mkdir(parents=True)
    keys_file.write_text(f"ops:sha256:{HEX} admin=true\nlegacy:{PLAIN} admin=true\nuser:{PLAIN}0\n")
    code, out, err = run_on(capsys, keys_file, "list")
    assert code == 0 and err == ""
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert rows["ops"] == ["ops", "default", "never", "active", "admin"]
    assert rows["legacy"] == ["legacy", "default", "never", "active", "admin", "(plaintext)"]
    assert rows["user"] == ["user", "default", "never", "active", "(plaintext)"]
    assert HEX not in out and PLAIN not in out


# ---------------------------------------------------------------- scopes (issue 16)


def test_generate_and_update_set_scopes_and_keep_the_key(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    key = generate(capsys, keys_file, "app", "--models", "llama-*,qwen3-8b", "--routes", "inference,tokenize",
                   "--tokens-per-minute", "1000", "--tokens-per-day", "50000", "--max-concurrent", "4")
    app = entries(keys_file)["app"]
    assert app.digest == digest(key)
    assert (app.models, app.routes, app.tokens_per_minute, app.tokens_per_day, app.max_concurrent) == (
        ("llama-*", "qwen3-8b"), frozenset({"inference", "tokenize"}), 1000, 50000, 4)
    assert keys_file.read_text().rstrip().endswith(
        "models=llama-*,qwen3-8b routes=inference,tokenize tokens_per_minute=1000 tokens_per_day=50000 "
        "max_concurrent=4")
    code, _, err = run(capsys, "--file", str(keys_file), "update", "--name", "app", "--models", "all",
                       "--tokens-per-day", "none", "--routes", "default,tokenize")
    assert code == 2 and "unknown route group" in err  # `default` only alone
    code, _, err = run(capsys, "--file", str(keys_file), "update", "--name", "app", "--models", "all",
                       "--tokens-per-day", "none", "--routes", "default")
    assert code == 0, err
    app = entries(keys_file)["app"]
    assert (app.models, app.routes, app.tokens_per_minute, app.tokens_per_day, app.max_concurrent) == (
        (), frozenset({"inference", "embeddings"}), 1000, None, 4)
    assert app.digest == digest(key)
    code, out, _ = run(capsys, "--file", str(keys_file), "list")
    assert "1000 tokens/min" in out and "4 at once" in out and "models" not in out


def test_routes_with_admin_make_an_admin_key(capsys: pytest.CaptureFixture[str], keys_file: Path) -> None:
    generate(capsys, keys_file, "ops", "--routes", "metrics,admin")
    ops = entries(keys_file)["ops"]
    assert ops.admin and ops.groups == {"metrics", "admin"}
    code, _, err = run(capsys, "--file", str(keys_file), "update", "--name", "ops", "--routes", "admin", "--no-admin")
    assert code == 2 and "--no-admin" in err
    assert run(capsys, "--file", str(keys_file), "update", "--name", "ops", "--no-admin")[0] == 0
    assert entries(keys_file)["ops"].groups == {"metrics"}


@pytest.mark.parametrize(("flag", "value"), [("--models", "a,,b"), ("--routes", "inferense"),
                                             ("--tokens-per-minute", "0"), ("--max-concurrent", "x")])
def test_bad_scope_flags_are_usage_errors(capsys: pytest.CaptureFixture[str], keys_file: Path, flag: str,
                                          value: str) -> None:
    code, _, err = run(capsys, "--file", str(keys_file), "generate", "--name", "x", flag, value)
    assert code == 2 and flag in err
    assert not keys_file.exists() or "x:" not in keys_file.read_text()
