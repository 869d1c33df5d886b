"""What a key may use: its route groups and its models (the `routes=` and `models=` options of the keys file).

The one rule of both lanes and of the model list:
- `group_of(path)`: the route group of every path a key can reach (gateway.keyfile.GROUPS). `/v1/models` and
  `/v1/models/{id}` belong to no group: every key may list models, and sees only those it may use.
- `route_refusal(entry, path)`: checked by gateway.auth.verdict, before anything is used up.
- `model_refusal(entry, names)`: checked once the request's model is known (its body read), by aiohttp's lane
  (gateway.proxy) and the fast lane (which hands a refused request to aiohttp's lane, so the 403 has one
  implementation), and for `/v1/models/{id}`.
- `model_allowed(entry, names)`: the same test, for filtering `/v1/models`.

A refusal is a 403 `permission_error` naming what is not allowed and what is.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import lru_cache
from typing import TYPE_CHECKING

from gateway.keyfile import ADMIN, EMBEDDINGS, INFERENCE, METRICS, TOKENIZE, KeyEntry
from gateway.routes import ADMIN_ROUTES
from lifecycle.routes import JSON_ROUTES

if TYPE_CHECKING:
    from gateway.auth import Refused

_TOKENIZE_PATHS = frozenset({"/tokenize", "/detokenize", "/apply-template"})


def _groups() -> dict[str, str]:
    groups: dict[str, str] = {}
    for path, route in JSON_ROUTES.items():
        if route.feature is not None:
            groups[path] = EMBEDDINGS  # embeddings and rerank
        elif path in _TOKENIZE_PATHS:
            groups[path] = TOKENIZE
        else:
            groups[path] = INFERENCE  # generation, and counting a prompt's tokens
    groups.update(dict.fromkeys(ADMIN_ROUTES, ADMIN))
    groups["/reload"] = ADMIN
    groups["/metrics"] = METRICS  # when METRICS_AUTH_ENABLED=true; else it needs no key at all
    return groups


GROUP_OF = _groups()
# PASSTHROUGH_ROUTES (lifecycle.settings' safe list), when opened: /slots shows what every slot is doing.
PASSTHROUGH_GROUP = {"/slots": METRICS, "/props": INFERENCE, "/lora-adapters": INFERENCE}


def group_of(path: str, passthrough: tuple[str, ...] = ()) -> str | None:
    """The route group of `path` (`passthrough`: the routes PASSTHROUGH_ROUTES opened); None for paths any key may
    use (the model list) and for routes that do not exist (their 404 follows)."""
    group = GROUP_OF.get(path)
    if group is None and path in passthrough:
        return PASSTHROUGH_GROUP.get(path)
    return group


def route_refusal(entry: KeyEntry, path: str, passthrough: tuple[str, ...] = ()) -> Refused | None:
    """None when `entry` may use `path`, else the 403 to give."""
    group = group_of(path, passthrough)
    if group is None or group in entry.groups:
        return None
    from gateway.auth import Admitted, Refused, require_admin

    if group == ADMIN:  # the admin routes' one rule, with its own message and code
        return require_admin(Admitted(entry.key_id, None, 0, entry.admin, entry))
    allowed = ", ".join(sorted(entry.groups)) or "none"
    return Refused(403, f"this API key may not use {path} (route group {group}); its route groups: {allowed}",
                   "route_not_allowed", "scope", key_id=entry.key_id)


@lru_cache(maxsize=4096)
def _matches(patterns: tuple[str, ...], names: tuple[str, ...]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns for name in names)


def model_allowed(entry: KeyEntry | None, names: tuple[str, ...]) -> bool:
    """Whether `entry` may use the model known by `names` (its id, file name and aliases); None (no key:
    AUTH_ENABLED=false) may use every model, and so may a key without `models=`."""
    return entry is None or not entry.models or _matches(entry.models, names)


def model_refusal(entry: KeyEntry | None, names: tuple[str, ...]) -> Refused | None:
    """None when `entry` may use the model known by `names` (its id first), else the 403 to give."""
    if model_allowed(entry, names):
        return None
    from gateway.auth import Refused

    assert entry is not None
    return Refused(403, f"this API key may not use the model {names[0]}; it may use: {', '.join(entry.models)}",
                   "model_not_allowed", "scope", key_id=entry.key_id)
