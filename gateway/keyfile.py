"""The API keys file: one key per line, shared by the gateway (reading) and the key CLI (writing).

    key_id:api_key[:rate_limit][:expiration]          plaintext, the old project's format
    key_id:sha256:<64 hex digits>[:rate_limit][:expiration]   hashed, what `python -m gateway.keys` writes

either followed by options: whitespace-separated `name=value` tokens at the end of the line, such as
`ops:sha256:<hex>:60 admin=true` or `app:sha256:<hex> models=llama-*,qwen3-8b routes=inference tokens_per_day=500000`:

    admin=true|false              the admin route group (model load/unload/refresh, POST /reload)
    models=NAME,GLOB,...          the models it may use, by id, file name or alias, `*` and `?` globs (default: all)
    routes=GROUP,...              the route groups it may use (gateway.scopes.GROUPS; default: inference,embeddings)
    tokens_per_minute=N           tokens (prompt + completion) over any 60 s, then 429 until they age out
    tokens_per_day=N              the same over any 24 h
    max_concurrent=N              requests of this key in flight at once

An unknown option, a bad value or an option given twice makes the line skipped with a warning that names the
line and the option, never the key: a typo must never grant anything, nor silently drop a restriction. Options are
only the trailing tokens that look like `name=value` (a lowercase name): an expiration written with a space
(`2027-01-01 10:00`) is still an expiration.

A plaintext key must be 16+ characters, so the 6-character `sha256` in the key position can never be a plaintext
key. `rate_limit` is requests per minute (empty = MAX_REQUESTS_PER_MINUTE); `expiration` is an ISO date or
date-time, with or without a timezone (naive means UTC; a bare date means the start of that day, UTC); it may
contain colons. Blank lines and `#` comments are ignored. Bad lines are skipped with a warning that names the
line number and never the key.

The file is bytes decoded as UTF-8 with `surrogateescape` (see `decode`), by the gateway and the CLI alike: a
comment with any byte in it (`# owner: M\xfcller` in Latin-1) is just a comment, and both read the same lines.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

log = logging.getLogger("gateway.keys")

MIN_KEY_LENGTH = 16
HASH_MARK = "sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[A-Za-z0-9_.@-]+")
_OPTION = re.compile(r"([a-z][a-z0-9_]{0,31})=(\S*)")  # a token that is an option rather than part of a field


ENCODING = "utf-8"
ERRORS = "surrogateescape"  # round-trips any bytes: undecodable ones become U+DC80..U+DCFF and back


def decode(data: bytes) -> str:
    """The keys file's bytes as text, the one way the gateway and the CLI both read it; never fails."""
    return data.decode(ENCODING, ERRORS)


def encode(text: str) -> bytes:
    """The inverse of `decode`, for writing the file back byte for byte."""
    return text.encode(ENCODING, ERRORS)


def read_text(path: Path) -> str:
    """The keys file as text (`decode`); raises only OSError."""
    return decode(path.read_bytes())


def digest(key: str) -> bytes:
    """SHA-256 of the key's bytes. Never fails, whatever the text: a key from a file line or from an HTTP header
    (aiohttp decodes headers as UTF-8 with surrogateescape, so a byte that is not UTF-8 arrives as a lone
    surrogate) hashes the bytes that were actually sent."""
    try:
        data = key.encode(ENCODING, ERRORS)
    except UnicodeEncodeError:  # a surrogate that no byte decodes to: not from a file or a header, still a key
        data = key.encode(ENCODING, "surrogatepass")
    return hashlib.sha256(data).digest()


# The route groups a key may be given (gateway.scopes maps every path to one); `admin` is the admin flag.
INFERENCE, EMBEDDINGS, TOKENIZE, METRICS, ADMIN = "inference", "embeddings", "tokenize", "metrics", "admin"
GROUPS = (INFERENCE, EMBEDDINGS, TOKENIZE, METRICS, ADMIN)
DEFAULT_ROUTES = frozenset({INFERENCE, EMBEDDINGS})
_MODEL_PATTERN = re.compile(r"[A-Za-z0-9_.:@/*?+-]+")


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    digest: bytes  # sha256 of the key; plaintext entries are hashed on load
    rate_limit: int | None = None
    expires: datetime | None = None
    hashed: bool = True
    admin: bool = False  # may use the admin routes (model load/unload/refresh): see gateway.auth.require_admin
    models: tuple[str, ...] = ()  # names and globs of the models it may use; () = every model
    routes: frozenset[str] = DEFAULT_ROUTES  # its route groups besides admin (the `admin` flag)
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    max_concurrent: int | None = None
    # Every route group it may use, admin included when it is an admin key (computed once: read on every request)
    groups: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "groups", self.routes | {ADMIN} if self.admin else self.routes)

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires

    @property
    def budgeted(self) -> bool:
        """Whether it has a token budget (its answers' tokens are then counted against it at once)."""
        return self.tokens_per_minute is not None or self.tokens_per_day is not None

    def line(self) -> str:
        """The entry as the CLI writes it (always hashed)."""
        fields = [self.key_id, HASH_MARK, self.digest.hex()]
        if self.rate_limit is not None or self.expires is not None:
            fields.append("" if self.rate_limit is None else str(self.rate_limit))
        if self.expires is not None:
            fields.append(self.expires.isoformat())
        return " ".join([":".join(fields), *self.options()])

    def options(self) -> list[str]:
        """The `name=value` tokens `line()` writes after the fields; only those that differ from the default."""
        custom = self.routes != DEFAULT_ROUTES  # then `routes=` says admin too; else `admin=true` does
        out = ["admin=true"] if self.admin and not custom else []
        if self.models:
            out.append("models=" + ",".join(self.models))
        if custom:
            out.append("routes=" + ",".join(group for group in GROUPS if group in self.groups))
        for name in ("tokens_per_minute", "tokens_per_day", "max_concurrent"):
            value = getattr(self, name)
            if value is not None:
                out.append(f"{name}={value}")
        return out


class KeyLineError(ValueError):
    """Why a line was skipped; never contains the key."""


class ShortKeyError(KeyLineError):
    """A plaintext key under MIN_KEY_LENGTH characters: refused, and never hashed by `import` (see gateway.keys)."""


def parse_expiry(text: str) -> datetime:
    text = text.strip()
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise KeyLineError("expiration is not an ISO date or date-time") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _rate(text: str) -> int | None:
    if text == "":
        return None
    if not text.isdigit() or int(text) < 1:
        raise KeyLineError("rate_limit is not a positive integer")
    return int(text)


def _boolean(name: str, text: str) -> bool:
    if text not in ("true", "false"):
        raise KeyLineError(f"option {name} must be true or false")
    return text == "true"


def _count(name: str, text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise KeyLineError(f"option {name} must be a positive integer")
    return int(text)


def _list(name: str, text: str) -> list[str]:
    items = text.split(",")
    if not text or any(not item for item in items):
        raise KeyLineError(f"option {name} must be a comma-separated list without empty items")
    return items


def model_patterns(name: str, text: str) -> tuple[str, ...]:
    """`models=`: names and globs; `*` alone is every model (the default)."""
    items = _list(name, text)
    for item in items:
        if not _MODEL_PATTERN.fullmatch(item):
            raise KeyLineError(f"option {name} holds a name with characters a model name cannot have")
    return () if "*" in items else tuple(dict.fromkeys(items))


def route_groups(name: str, text: str) -> frozenset[str]:
    """`routes=`: route groups (GROUPS); `admin` among them is the admin flag (see _options)."""
    items = _list(name, text)
    unknown = [item for item in items if item not in GROUPS]
    if unknown:
        raise KeyLineError(f"option {name}: unknown route group {unknown[0][:32]}: use {', '.join(GROUPS)}")
    return frozenset(items)


# name -> (KeyEntry field, parser of the value); parsers raise KeyLineError naming the option, never the value
_OPTIONS: dict[str, tuple[str, Callable[[str, str], object]]] = {
    "admin": ("admin", _boolean),
    "models": ("models", model_patterns),
    "routes": ("routes", route_groups),
    "tokens_per_minute": ("tokens_per_minute", _count),
    "tokens_per_day": ("tokens_per_day", _count),
    "max_concurrent": ("max_concurrent", _count),
}


def split_options(line: str) -> tuple[str, list[tuple[str, str]]]:
    """The line without its trailing `name=value` tokens, and those tokens in the order written.

    Only tokens after the first whitespace count: the fields themselves (key_id:...) are the first token."""
    fields = line.strip()
    found: list[tuple[str, str]] = []
    while True:
        parts = fields.rsplit(None, 1)
        if len(parts) < 2:
            break
        head, last = parts
        option = _OPTION.fullmatch(last)
        if option is None:
            break
        found.append((option.group(1), option.group(2)))
        fields = head.rstrip()
    found.reverse()
    return fields, found


def _options(found: list[tuple[str, str]]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, text in found:
        known = _OPTIONS.get(name)
        if known is None:
            raise KeyLineError(f"unknown option {name}")
        attribute, parse = known
        if attribute in values:
            raise KeyLineError(f"option {name} is given twice")
        values[attribute] = parse(name, text)
    routes = values.get("routes")
    if isinstance(routes, frozenset) and ADMIN in routes:
        if values.get("admin") is False:
            raise KeyLineError("option routes names admin but admin=false")
        values["admin"], values["routes"] = True, routes - {ADMIN}
    return values


def parse_line(line: str) -> KeyEntry:
    line, found = split_options(line)
    options = _options(found)
    key_id, sep, rest = line.partition(":")
    if not sep or not _KEY_ID.fullmatch(key_id):
        raise KeyLineError("expected key_id:api_key with a key_id of letters, digits, _ . @ -")
    if rest.startswith(HASH_MARK + ":"):
        parts = rest[len(HASH_MARK) + 1:].split(":", 2)
        hexdigest = parts[0]
        if not _HEX64.fullmatch(hexdigest):
            raise KeyLineError("a hashed entry needs 64 lowercase hex digits after sha256:")
        key_digest, hashed = bytes.fromhex(hexdigest), True
    else:
        parts = rest.split(":", 2)
        if len(parts[0]) < MIN_KEY_LENGTH:
            raise ShortKeyError(f"the key is shorter than {MIN_KEY_LENGTH} characters")
        key_digest, hashed = digest(parts[0]), False
    rate = _rate(parts[1].strip()) if len(parts) > 1 else None
    expires = parse_expiry(parts[2]) if len(parts) > 2 and parts[2].strip() else None
    return KeyEntry(key_id, key_digest, rate, expires, hashed, **options)  # type: ignore[arg-type]


def key_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, stripped line) of every line that is not blank or a comment: the lines that are keys."""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield number, line


def parse_keys(text: str, source: str = "keys file") -> list[KeyEntry]:
    entries = []
    for number, line in key_lines(text):
        try:
            entries.append(parse_line(line))
        except KeyLineError as exc:
            log.warning("%s line %d skipped: %s", source, number, exc)
    return entries
