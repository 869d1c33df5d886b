"""`python -m gateway.keys`: create, list, update, rotate and remove API keys in the keys file.

    python -m gateway.keys generate --name ID [--rate-limit N] [--expires 30d|24h|60m|ISO] [--admin]
    python -m gateway.keys list
    python -m gateway.keys update --name ID [--admin|--no-admin] [--rate-limit N] [--expires 30d|24h|60m|ISO]
    python -m gateway.keys rotate --name ID
    python -m gateway.keys remove --name ID
    python -m gateway.keys usage [--since 7d|24h|90m|ISO] [--key ID] [--model M] [--csv|--json] [--db PATH]

`--file PATH` (default: AUTH_KEYS_FILE, else $DATA_DIR/api_keys.txt) and `--quiet` go before or after the
subcommand. A new key is printed once, alone on stdout; only its sha256 is stored (see gateway/keyfile.py).
Everything else goes to stderr, and no key or hash is ever printed again.

Changes are made under an exclusive lock on `<file>.lock` and written atomically (temp file, fsync, mode 0600,
rename), touching only the lines of the key id named; comments, blank lines, plaintext and even invalid lines are
kept byte for byte. The gateway picks the change up by itself.

Exit codes: 0 ok, 1 operational error (unknown or duplicate id, unreadable file), 2 usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import secrets
import shlex
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.keyfile import HASH_MARK, KeyEntry, KeyLineError, digest, encode, parse_expiry, parse_line, read_text
from lifecycle.settings import Settings, SettingsError

KEY_PREFIX = "sk-"
FILE_MODE = 0o600
_RELATIVE = re.compile(r"(\d+)([dhm])")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


class KeysError(Exception):
    """An operational failure (exit 1); str() is the message, which never contains a key."""


class UsageError(Exception):
    """A usage failure found after parsing (exit 2)."""


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


# ---------------------------------------------------------------- argument types


def key_id(text: str) -> str:
    """A key id as the keys file allows it (letters, digits, _ . @ -)."""
    try:
        parse_line(f"{text}:{HASH_MARK}:{'0' * 64}")
    except KeyLineError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid key id: use letters, digits, _ . @ -") from None
    return text


def rate_limit(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (requests per minute)")
    return int(text)


def expiry(text: str, now: datetime | None = None) -> datetime:
    """`30d`, `24h`, `60m` from now (UTC), or an ISO date / date-time (naive means UTC); never in the past."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.fullmatch(text.strip())
    if relative:
        amount = int(relative.group(1))
        if amount < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: the amount must be at least 1")
        try:
            moment = now.replace(microsecond=0) + timedelta(**{_UNITS[relative.group(2)]: amount})
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{text!r} is too far in the future") from None
    else:
        try:
            moment = parse_expiry(text)
        except KeyLineError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not allowed: use 30d, 24h, 60m (from now) or an ISO date/date-time like 2030-01-31"
            ) from None
    if moment <= now:
        raise argparse.ArgumentTypeError(f"{text!r} is in the past")
    return moment


# ---------------------------------------------------------------- the file


@dataclass
class KeysFile:
    """The file's lines, each with its line ending, exactly as read."""

    path: Path
    lines: list[str]

    @classmethod
    def read(cls, path: Path) -> KeysFile:
        try:
            text = read_text(path)  # as the gateway reads it; any bytes round-trip, so other lines are kept exactly
        except FileNotFoundError:
            text = ""
        except OSError as exc:
            raise KeysError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
        return cls(path, text.splitlines(keepends=True))

    @property
    def newline(self) -> str:
        return "\r\n" if self.lines and self.lines[0].endswith("\r\n") else "\n"

    def text(self) -> str:
        return "".join(self.lines)

    def indexes(self, name: str) -> list[int]:
        """Lines that belong to `name`, valid or not (the gateway reads every valid one as a working key)."""
        found = []
        for index, raw in enumerate(self.lines):
            line = raw.strip()
            if line and not line.startswith("#") and line.partition(":")[0].strip() == name:
                found.append(index)
        return found

    def entry(self, index: int) -> KeyEntry | None:
        try:
            return parse_line(self.lines[index].strip())
        except KeyLineError:
            return None

    def append(self, line: str) -> None:
        if self.lines and not self.lines[-1].endswith(("\n", "\r")):
            self.lines[-1] += self.newline
        self.lines.append(line + self.newline)

    def replace(self, index: int, line: str) -> None:
        old = self.lines[index]
        ending = old[len(old.rstrip("\r\n")) :] or ("" if index == len(self.lines) - 1 else self.newline)
        self.lines[index] = line + ending


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `<file>.lock` (kept, never deleted, so every writer locks the same inode)."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise KeysError(f"cannot open lock file {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text`: temp file in the same folder, fsync, 0600, rename, fsync the folder."""
    try:
        owner = os.stat(path)
    except OSError:
        owner = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(encode(text))
            handle.flush()
            os.fchmod(handle.fileno(), FILE_MODE)
            if owner is not None:  # keep the file readable by the user the gateway runs as (works as root)
                with contextlib.suppress(OSError):
                    os.fchown(handle.fileno(), owner.st_uid, owner.st_gid)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def change(path: Path, edit: Callable[[KeysFile], None], missing: str | None = None) -> None:
    """Read, edit and write the file under the lock, so concurrent runs never lose each other's changes.

    A missing file (and folder) is created, unless `missing` is given: then that is the error.
    """
    if missing is not None:
        if not path.exists():
            raise KeysError(missing)
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KeysError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    with locked(path):
        keys = KeysFile.read(path)
        edit(keys)
        try:
            write_atomic(path, keys.text())
        except OSError as exc:
            raise KeysError(f"cannot write {path}: {exc.strerror or exc}") from None


def default_file() -> Path | None:
    """The file this CLI uses when neither --file, AUTH_KEYS_FILE nor DATA_DIR is given (None if unknown)."""
    try:
        return Settings.from_env({}).keys_file
    except SettingsError:
        return None


def command(path: Path, *args: str) -> str:
    """A shell command line running this CLI on the keys file `path`, as the gateway's hints print it.

    It works as written from any folder and any shell: the Python that runs the gateway, and `--file` with the
    absolute path unless that is the file the CLI finds by itself without DATA_DIR or AUTH_KEYS_FILE (under
    `make serve`, DATA_DIR=./data, the bare CLI would look in /data)."""
    parts = [sys.executable or "python3", "-m", "gateway.keys"]
    absolute = Path(os.path.abspath(path))
    if absolute != default_file():
        parts += ["--file", str(absolute)]
    return shlex.join([*parts, *args])


def resolve_file(given: Path | None) -> Path:
    if given is None:
        env = os.environ.get("AUTH_KEYS_FILE", "").strip()
        if env:
            given = Path(env).expanduser()
        else:
            try:
                given = Settings.from_env().keys_file
            except SettingsError as exc:
                raise UsageError(str(exc)) from None
    # Write through a symlink to the real file rather than replacing the link.
    return Path(os.path.realpath(given)) if given.is_symlink() else given


# ---------------------------------------------------------------- commands


def _describe(entry: KeyEntry) -> str:
    limit = "default rate limit" if entry.rate_limit is None else f"{entry.rate_limit}/min"
    expires = "never expires" if entry.expires is None else f"expires {entry.expires.isoformat()}"
    return f"{limit}, {expires}" + (", admin" if entry.admin else "")


def _valid(keys: KeysFile, name: str, path: Path) -> tuple[list[int], list[tuple[int, KeyEntry]]]:
    """The lines of `name` and its valid entries; KeysError when there is none (the id is unknown or every line of
    it is invalid)."""
    indexes = keys.indexes(name)
    valid = [(i, e) for i in indexes if (e := keys.entry(i)) is not None]
    if not indexes:
        raise KeysError(f"unknown key id {name!r} in {path}")
    if not valid:
        numbers = ", ".join(str(i + 1) for i in indexes)
        raise KeysError(f"key id {name!r} has no valid line in {path} (line {numbers}): fix or remove it")
    return indexes, valid


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message, file=sys.stderr)


def cmd_generate(args: argparse.Namespace, path: Path) -> int:
    key = new_key()
    entry = KeyEntry(args.name, digest(key), args.rate_limit, args.expires, admin=args.admin)

    def edit(keys: KeysFile) -> None:
        existing = keys.indexes(args.name)
        if existing:
            numbers = ", ".join(str(i + 1) for i in existing)
            raise KeysError(f"key id {args.name!r} already exists in {path} (line {numbers}): use rotate or remove")
        keys.append(entry.line())

    change(path, edit)
    print(key)
    _note(args, f"created key {args.name!r} in {path} ({_describe(entry)}); it is shown only this once")
    return 0


def cmd_rotate(args: argparse.Namespace, path: Path) -> int:
    key = new_key()
    rotated: list[KeyEntry] = []

    def edit(keys: KeysFile) -> None:
        indexes, valid = _valid(keys, args.name, path)
        first, old = valid[0]
        entry = replace(old, digest=digest(key), hashed=True)  # the same limit, expiry and options
        keys.replace(first, entry.line())
        # Every other line of this id goes too: each valid one would still let its old key in.
        for index in reversed(indexes):
            if index != first:
                del keys.lines[index]
        rotated.append(entry)

    change(path, edit, missing=f"unknown key id {args.name!r}: {path} does not exist")
    entry = rotated[0]
    print(key)
    _note(args, f"rotated key {args.name!r} in {path} ({_describe(entry)}); the old key no longer works")
    if entry.expired(datetime.now(UTC)):
        print(f"warning: key {args.name!r} had already expired, so the new key is expired too", file=sys.stderr)
    return 0


def cmd_update(args: argparse.Namespace, path: Path) -> int:
    changes: dict[str, object] = {}
    if args.admin is not None:
        changes["admin"] = args.admin
    if args.rate_limit is not None:
        changes["rate_limit"] = args.rate_limit
    if args.expires is not None:
        changes["expires"] = args.expires
    if not changes:
        raise UsageError("update needs at least one of --admin, --no-admin, --rate-limit, --expires")
    updated: list[KeyEntry] = []

    def edit(keys: KeysFile) -> None:
        _, valid = _valid(keys, args.name, path)
        # Every valid line of the id: each one lets its key in with its own limit, expiry and options.
        for index, old in valid:
            entry = replace(old, **changes)  # type: ignore[arg-type]
            keys.replace(index, entry.line())  # the same hash, written hashed (a plaintext key keeps working)
            updated.append(entry)

    change(path, edit, missing=f"unknown key id {args.name!r}: {path} does not exist")
    lines = "" if len(updated) == 1 else f"; {len(updated)} lines"
    _note(args, f"updated key {args.name!r} in {path} ({_describe(updated[0])}{lines})")
    return 0


def cmd_remove(args: argparse.Namespace, path: Path) -> int:
    removed: list[int] = []

    def edit(keys: KeysFile) -> None:
        indexes = keys.indexes(args.name)
        if not indexes:
            raise KeysError(f"unknown key id {args.name!r} in {path}")
        for index in reversed(indexes):
            del keys.lines[index]
        removed.extend(indexes)

    change(path, edit, missing=f"unknown key id {args.name!r}: {path} does not exist")
    lines = "1 line" if len(removed) == 1 else f"{len(removed)} lines"
    _note(args, f"removed key {args.name!r} from {path} ({lines})")
    return 0


def cmd_list(args: argparse.Namespace, path: Path) -> int:
    if not path.exists():
        _note(args, f"no keys: {path} does not exist")
        return 0
    keys = KeysFile.read(path)
    now = datetime.now(UTC)
    rows: list[tuple[str, ...]] = []
    for number, raw in enumerate(keys.lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = parse_line(line)
        except KeyLineError as exc:
            print(f"warning: {path} line {number} skipped: {exc}", file=sys.stderr)
            continue
        rows.append(
            (
                entry.key_id,
                "default" if entry.rate_limit is None else str(entry.rate_limit),
                "never" if entry.expires is None else entry.expires.isoformat(),
                "expired" if entry.expired(now) else "active",
                " ".join(note for note, on in (("admin", entry.admin), ("(plaintext)", not entry.hashed)) if on),
            )
        )
    if not rows:
        _note(args, f"no keys in {path}")
        return 0
    table = rows if args.quiet else [("ID", "RATE LIMIT", "EXPIRES", "STATUS", ""), *rows]
    widths = [max(len(row[col]) for row in table) for col in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def cmd_usage(args: argparse.Namespace, path: Path) -> int:
    """The usage ledger (gateway/ledger.py, docs/USAGE.md): USAGE_DB, else $DATA_DIR/usage.sqlite3; read-only."""
    from gateway import ledger

    return ledger.usage_command(args, lambda: Settings.from_env().usage_db, lambda text: _note(args, text))


# ---------------------------------------------------------------- command line


def _common(sub: bool) -> argparse.ArgumentParser:
    """--file/--quiet, accepted before and after the subcommand; the subcommand copy must not reset them."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--file",
        type=Path,
        default=argparse.SUPPRESS if sub else None,
        help="the keys file (default: AUTH_KEYS_FILE, else $DATA_DIR/api_keys.txt)",
    )
    parent.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS if sub else False,
        help="generate/rotate print only the key; other commands print nothing but their output",
    )
    return parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.keys", description="Manage the gateway's API keys.", parents=[_common(False)]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common(True)]

    generate = commands.add_parser("generate", parents=common, help="create a key and print it once")
    generate.add_argument("--name", required=True, type=key_id, help="the key id")
    generate.add_argument("--rate-limit", type=rate_limit, help="requests/minute (default: MAX_REQUESTS_PER_MINUTE)")
    generate.add_argument("--expires", type=expiry, help="30d, 24h, 60m from now, or an ISO date/date-time")
    generate.add_argument("--admin", action="store_true", help="an admin key (model load/unload/refresh)")
    generate.set_defaults(func=cmd_generate)

    listing = commands.add_parser("list", parents=common,
                                  help="show ids, limits, expiry, status and admin keys (never keys)")
    listing.set_defaults(func=cmd_list)

    update = commands.add_parser("update", parents=common,
                                 help="change a key's admin flag, rate limit or expiry, keeping the key")
    update.add_argument("--name", required=True, type=key_id, help="the key id")
    admin = update.add_mutually_exclusive_group()
    admin.add_argument("--admin", dest="admin", action="store_true", default=None, help="make it an admin key")
    admin.add_argument("--no-admin", dest="admin", action="store_false", help="make it an ordinary key")
    update.add_argument("--rate-limit", type=rate_limit, help="requests/minute")
    update.add_argument("--expires", type=expiry, help="30d, 24h, 60m from now, or an ISO date/date-time")
    update.set_defaults(func=cmd_update)

    rotate = commands.add_parser("rotate", parents=common,
                                 help="replace a key, keeping its limit, expiry and admin flag")
    rotate.add_argument("--name", required=True, type=key_id, help="the key id")
    rotate.set_defaults(func=cmd_rotate)

    remove = commands.add_parser("remove", parents=common, help="delete a key")
    remove.add_argument("--name", required=True, type=key_id, help="the key id")
    remove.set_defaults(func=cmd_remove)

    usage = commands.add_parser("usage", parents=common, help="requests and tokens per key and model (the ledger)")
    from gateway.ledger import add_arguments

    add_arguments(usage)
    usage.set_defaults(func=cmd_usage)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse: 2 on a usage error, 0 for --help
        return exc.code if isinstance(exc.code, int) else 2
    try:
        path = resolve_file(args.file)
        return int(args.func(args, path))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
