"""API keys: the seed's keys file (`key_id:api_key[:rate_limit][:expiration]`) checked in constant time.

Fails closed: with AUTH_ENABLED=true and no usable key, every /v1/* request gets a 401.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("gateway.auth")

MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class KeyRing:
    keys: tuple[tuple[str, bytes], ...] = ()  # (key_id, key)

    def __len__(self) -> int:
        return len(self.keys)

    def match(self, presented: str) -> str | None:
        """The key_id of `presented`, comparing against every key so timing says nothing."""
        candidate = presented.encode()
        found = None
        for key_id, key in self.keys:
            if hmac.compare_digest(candidate, key) and found is None:
                found = key_id
        return found


def parse_keys(text: str, source: str = "keys file") -> KeyRing:
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id, sep, rest = line.partition(":")
        key = rest.split(":", 1)[0]
        if not sep or not key_id or len(key) < MIN_KEY_LENGTH:
            log.warning("%s line %d skipped: expected key_id:api_key with a key of %d+ characters",
                        source, number, MIN_KEY_LENGTH)
            continue
        keys.append((key_id, key.encode()))
    return KeyRing(tuple(keys))


def load_keys(path: Path) -> KeyRing:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return KeyRing()
    except OSError as exc:
        log.warning("cannot read keys file %s: %s", path, exc.strerror)
        return KeyRing()
    return parse_keys(text, str(path))


def bearer_token(header: str) -> str:
    """`Bearer <key>` or, as in the seed, the bare key."""
    scheme, _, token = header.strip().partition(" ")
    if token and scheme.lower() == "bearer":
        return token.strip()
    return header.strip()
