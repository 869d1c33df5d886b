"""`python -m gateway.keys`: create, list, update, rotate, remove and import API keys in the keys file.

    python -m gateway.keys generate --name ID [--rate-limit N] [--expires 30d|24h|60m|ISO] [--admin] [SCOPES]
    python -m gateway.keys list
    python -m gateway.keys update --name ID [--admin|--no-admin] [--rate-limit N] [--expires 30d|24h|60m|ISO]
                                  [SCOPES]
    python -m gateway.keys rotate --name ID
    python -m gateway.keys remove --name ID
    python -m gateway.keys import
    python -m gateway.keys usage [--since 7d|24h|90m|ISO] [--key ID] [--model M] [--csv|--json] [--db PATH]

SCOPES (gateway/keyfile.py's options): `--models NAME,GLOB,...` (or `all`), `--routes GROUP,...` (or `default`),
`--tokens-per-minute N`, `--tokens-per-day N`, `--max-concurrent N` (`none` lifts a limit in update).

`--file PATH` (default: AUTH_KEYS_FILE, else $DATA_DIR/api_keys.txt) and `--quiet` go before or after the
subcommand. A new key is printed once, alone on stdout; only its sha256 is stored (see gateway/keyfile.py).
Everything else goes to stderr, and no key or hash is ever printed again.

Changes are made under an exclusive lock on `<file>.lock` and written atomically (temp file, fsync, mode 0600,
rename), touching only the lines of the key id named; comments, blank lines, plaintext and even invalid lines are
kept byte for byte. The gateway picks the change up by itself.

`import` hashes the old project's plaintext keys in place (cmd_import). Every change is also one line of the
audit log, $DATA_DIR/logs/audit/audit.jsonl (gateway.audit; who: `cli`); a line that cannot be written is a
warning, and the change stands.

Exit codes: 0 ok, 1 operational error (unknown or duplicate id, unreadable file; `import`: a line left that the
gateway does not load), 2 usage error.
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

from gateway.audit import CLI, OK, REFUSED, AuditLog, cli_source
from gateway.keyfile import (
    ADMIN,
    DEFAULT_ROUTES,
    GROUPS,
    HASH_MARK,
    MIN_KEY_LENGTH,
    KeyEntry,
    KeyLineError,
    ShortKeyError,
    digest,
    encode,
    model_patterns,
    parse_expiry,
    parse_line,
    read_text,
    route_groups,
)
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


def models_arg(text: str) -> tuple[str, ...]:
    """`--models`: names and globs, comma-separated, or `all`."""
    try:
        return () if text == "all" else model_patterns("models", text)
    except KeyLineError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def routes_arg(text: str) -> frozenset[str]:
    """`--routes`: route groups, comma-separated, or `default` (inference,embeddings)."""
    try:
        return DEFAULT_ROUTES if text == "default" else route_groups("routes", text)
    except KeyLineError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def limit_arg(text: str) -> int | None:
    """A positive count, or `none` (no limit)."""
    if text == "none":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (or none)")
    return int(text)


SCOPE_FLAGS = ("models", "routes", "tokens_per_minute", "tokens_per_day", "max_concurrent")


def scope_changes(args: argparse.Namespace) -> dict[str, object]:
    """The KeyEntry fields the scope flags given set (`--routes` with admin sets the admin flag too)."""
    changes: dict[str, object] = {}
    for name in SCOPE_FLAGS:
        value = getattr(args, name, argparse.SUPPRESS)
        if value is not argparse.SUPPRESS:
            changes[name] = value
    routes = changes.get("routes")
    if isinstance(routes, frozenset) and ADMIN in routes:
        if args.command == "update" and args.admin is False:  # (generate's --admin is False when not given)
            raise UsageError("--routes names admin but --no-admin is given")
        changes["routes"], changes["admin"] = routes - {ADMIN}, True
    return changes


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
    return f"{limit}, {expires}" + (", admin" if entry.admin else "") + "".join(f", {s}" for s in _scopes(entry))


def _scopes(entry: KeyEntry) -> list[str]:
    """What `list` and the messages say of a key's scopes: only what differs from the defaults."""
    out = []
    if entry.models:
        out.append("models " + ",".join(entry.models))
    if entry.routes != DEFAULT_ROUTES:
        out.append("routes " + ",".join(group for group in GROUPS if group in entry.groups))
    for name, unit in (("tokens_per_minute", "tokens/min"), ("tokens_per_day", "tokens/day"),
                       ("max_concurrent", "at once")):
        value = getattr(entry, name)
        if value is not None:
            out.append(f"{value} {unit}")
    return out


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


def _audit(path: Path, action: str, target: str, result: str = OK, **details: object) -> None:
    """The audit line of a change just made (gateway.audit), in the gateway's $DATA_DIR/logs/audit/. Never a key
    or a hash. When it cannot be written the change stands, with a warning (the CLI never creates DATA_DIR)."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"warning: no audit line written: {exc}", file=sys.stderr)
        return
    if not settings.data_dir.is_dir():
        print(f"warning: no audit line written: DATA_DIR {settings.data_dir} does not exist (run with the "
              "gateway's DATA_DIR)", file=sys.stderr)
        return
    audit = AuditLog(settings.audit_dir)
    problem = audit.add(CLI, action, target, cli_source(), result, {"file": str(path), **details})
    if problem is not None:
        print(f"warning: the change is made, but no audit line was written to {audit.path} ({problem})",
              file=sys.stderr)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def cmd_generate(args: argparse.Namespace, path: Path) -> int:
    key = new_key()
    entry = replace(KeyEntry(args.name, digest(key), args.rate_limit, args.expires, admin=args.admin),
                    **scope_changes(args))  # type: ignore[arg-type]

    def edit(keys: KeysFile) -> None:
        existing = keys.indexes(args.name)
        if existing:
            numbers = ", ".join(str(i + 1) for i in existing)
            raise KeysError(f"key id {args.name!r} already exists in {path} (line {numbers}): use rotate or remove")
        keys.append(entry.line())

    change(path, edit)
    print(key)
    _note(args, f"created key {args.name!r} in {path} ({_describe(entry)}); it is shown only this once")
    _audit(path, "key.create", args.name, rate_limit=entry.rate_limit, expires=_iso(entry.expires),
           admin=entry.admin)
    return 0


def cmd_rotate(args: argparse.Namespace, path: Path) -> int:
    key = new_key()
    rotated: list[KeyEntry] = []
    removed: list[int] = []

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
        removed.append(len(indexes) - 1)

    change(path, edit, missing=f"unknown key id {args.name!r}: {path} does not exist")
    entry = rotated[0]
    print(key)
    _note(args, f"rotated key {args.name!r} in {path} ({_describe(entry)}); the old key no longer works")
    _audit(path, "key.rotate", args.name, other_lines_removed=removed[0])
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
    changes.update(scope_changes(args))
    if not changes:
        raise UsageError("update needs at least one of --admin, --no-admin, --rate-limit, --expires, --models, "
                         "--routes, --tokens-per-minute, --tokens-per-day, --max-concurrent")
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
    _audit(path, "key.update", args.name, lines=len(updated),
           changed={k: _iso(v) if isinstance(v, datetime) else v for k, v in changes.items()})
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
    _audit(path, "key.remove", args.name, lines=len(removed))
    return 0


def cmd_import(args: argparse.Namespace, path: Path) -> int:
    """Hash the old project's plaintext lines in place: the same id, rate limit, expiry and options, the same line
    ending, so every key keeps working; every other line is kept byte for byte. A plaintext key under 16
    characters is left as it is (the gateway refuses it, and its hash would make a guessable key work), and so is
    a line that does not parse: both are listed, and the exit code is then 1. A second run changes nothing."""
    if not path.exists():
        raise KeysError(f"nothing to import: {path} does not exist")
    imported: dict[str, list[int]] = {}
    short: list[tuple[int, str]] = []
    invalid: list[tuple[int, str]] = []
    with locked(path):
        keys = KeysFile.read(path)
        for index, raw in enumerate(keys.lines):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            try:
                entry = parse_line(line)
            except ShortKeyError:  # its key id is valid: parse_line checks the id before the key
                short.append((index + 1, line.partition(":")[0]))
                continue
            except KeyLineError as exc:  # the reason never holds the key, and no id is shown (it may not be one)
                invalid.append((index + 1, str(exc)))
                continue
            if not entry.hashed:
                keys.replace(index, entry.line())
                imported.setdefault(entry.key_id, []).append(index + 1)
        if imported:
            try:
                write_atomic(path, keys.text())
            except OSError as exc:
                raise KeysError(f"cannot write {path}: {exc.strerror or exc}") from None
    for name, numbers in imported.items():
        _note(args, f"hashed key {name!r} in place (line {', '.join(map(str, numbers))}); it keeps working")
        _audit(path, "key.import", name, lines=numbers)
    for number, name in short:
        print(f"warning: {path} line {number}: key {name!r} is NOT hashed: its plaintext key is shorter than "
              f"{MIN_KEY_LENGTH} characters, short enough to guess, so the gateway refuses it (hashing it would make "
              f"it work). Give it a new key: {command(path, 'remove', '--name', name)} && "
              f"{command(path, 'generate', '--name', name)}", file=sys.stderr)
        _audit(path, "key.import", name, REFUSED, line=number, reason=f"key shorter than {MIN_KEY_LENGTH} characters")
    for number, reason in invalid:
        print(f"warning: {path} line {number} is left as it is: {reason} (the gateway skips it; fix or remove it, "
              "then run import again)", file=sys.stderr)
    count = sum(len(numbers) for numbers in imported.values())
    if count:
        _note(args, f"imported {count} plaintext key(s) in {path}: stored as sha256 hashes now, the same keys work")
    else:
        _note(args, f"nothing to import: no valid plaintext key in {path}")
    return 1 if short or invalid else 0


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
                " ".join([*(note for note, on in (("admin", entry.admin), ("(plaintext)", not entry.hashed)) if on),
                          *_scopes(entry)]),
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


def _scope_flags(parser: argparse.ArgumentParser) -> None:
    """The scope options of the keys file (gateway/keyfile.py); left out, a flag changes nothing."""
    none = argparse.SUPPRESS
    parser.add_argument("--models", type=models_arg, default=none,
                        help="models it may use: ids, file names, aliases, * ? globs, comma-separated; all (default)")
    parser.add_argument("--routes", type=routes_arg, default=none,
                        help=f"route groups it may use, comma-separated: {', '.join(GROUPS)}; "
                             "default (inference,embeddings)")
    parser.add_argument("--tokens-per-minute", type=limit_arg, default=none, help="token budget over 60 s (or none)")
    parser.add_argument("--tokens-per-day", type=limit_arg, default=none, help="token budget over 24 h (or none)")
    parser.add_argument("--max-concurrent", type=limit_arg, default=none, help="requests in flight at once (or none)")


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
    _scope_flags(generate)
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
    _scope_flags(update)
    update.set_defaults(func=cmd_update)

    rotate = commands.add_parser("rotate", parents=common,
                                 help="replace a key, keeping its limit, expiry and admin flag")
    rotate.add_argument("--name", required=True, type=key_id, help="the key id")
    rotate.set_defaults(func=cmd_rotate)

    remove = commands.add_parser("remove", parents=common, help="delete a key")
    remove.add_argument("--name", required=True, type=key_id, help="the key id")
    remove.set_defaults(func=cmd_remove)

    imports = commands.add_parser("import", parents=common,
                                  help="hash the old project's plaintext keys in place (they keep working)")
    imports.set_defaults(func=cmd_import)

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
