"""API keys: who may call, checked in constant time, reloaded from the keys file without a restart.

Fails closed: with AUTH_ENABLED=true and no usable key, every protected request gets a 401. Repeated failed keys
from one client address are answered 429 for a while, so keys cannot be guessed at speed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from gateway.keyfile import KeyEntry, digest, parse_keys

log = logging.getLogger("gateway.auth")


@dataclass(frozen=True)
class KeyRing:
    entries: tuple[KeyEntry, ...] = ()
    _by_digest: dict[bytes, KeyEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_digest: dict[bytes, KeyEntry] = {}
        for entry in self.entries:
            by_digest.setdefault(entry.digest, entry)  # a key listed twice: the first line wins
        object.__setattr__(self, "_by_digest", by_digest)

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, presented: str) -> KeyEntry | None:
        """The entry for `presented`, looked up by the key's SHA-256 digest.

        Nothing is compared with a stored key itself, only digests: a caller controls the input of the hash, not
        its output, so how long the lookup takes says nothing usable about any stored key. One lookup, however many
        keys the file holds (a loop of constant-time comparisons cost 0.1 us per key on every request)."""
        return self._by_digest.get(digest(presented))


def bearer_token(header: str) -> str:
    """`Bearer <key>` or, as in the seed, the bare key."""
    scheme, _, token = header.strip().partition(" ")
    if token and scheme.lower() == "bearer":
        return token.strip()
    return header.strip()


def utcnow() -> datetime:
    return datetime.now(UTC)


class KeyStore:
    """Owns the current KeyRing. Reloads happen off the request path: file I/O runs in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.ring = KeyRing()
        self._stamp: tuple[int, int, int] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self, force: bool) -> KeyRing | None:
        stamp = self._stat()
        if not force and stamp == self._stamp:
            return None
        self._stamp = stamp
        if stamp is None:
            if force or self.ring:
                log.warning("keys file %s is missing: no API keys loaded", self.path)
            return KeyRing()
        try:
            text = self.path.read_text()
        except OSError as exc:
            log.warning("cannot read keys file %s: %s", self.path, exc.strerror)
            return KeyRing()
        ring = KeyRing(tuple(parse_keys(text, str(self.path))))
        log.info("loaded %d API key(s) from %s", len(ring), self.path)
        return ring

    def load(self) -> KeyRing:
        """Blocking first load, before the event loop serves requests."""
        ring = self._read(force=True)
        self.ring = ring if ring is not None else self.ring
        return self.ring

    async def reload(self, force: bool = False) -> bool:
        ring = await asyncio.to_thread(self._read, force)
        if ring is None:
            return False
        self.ring = ring
        return True

    async def watch(self, interval: float = 1.0) -> None:
        """Pick up a changed file by itself, checking at most once a second."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception:  # never let the watcher die
                log.exception("reloading the keys file failed")


def caller_key(ring: KeyRing, header: str) -> KeyEntry | None:
    """The entry of a known, unexpired key sent in an Authorization header value; None for anything else.
    (gateway.app.authorize also tells apart why a key is refused, for its error messages.)"""
    token = bearer_token(header)
    entry = ring.match(token) if token else None
    if entry is None or (entry.expires is not None and entry.expired(utcnow())):
        return None
    return entry
