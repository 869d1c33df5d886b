"""GET /v1/models and GET /v1/models/{id}: the models served, with their status and GGUF metadata.

With several models (MODELS) the list is the gateway's own: every model of the ModelSet with its router status
(loaded, loading, sleeping, unloaded), its aliases, its GGUF metadata (lifecycle.ggufinfo: architecture, parameter
count, quantization, context length, file size) and, while it runs, what its llama-server reports (`meta`, the
field clients of a single llama-server read). With one model, the list is llama-server's, unchanged;
`/v1/models/{id}` picks the entry by id, by the model's file name or by `any`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from gateway.errors import error_body
from gateway.keyfile import KeyEntry
from gateway.scopes import model_allowed, model_refusal
from lifecycle.backend import Backend
from lifecycle.ggufinfo import read_info
from lifecycle.router import ANY, ServedModel
from lifecycle.upstream import Reply, UpstreamError

if TYPE_CHECKING:
    from gateway.pipeline import Exchange, Pipeline, Refusal

MODEL_PREFIX = "/v1/models/"
JSON = "application/json"
# What the router adds to its entries that a client has no use for (its command lines, our paths, presets).
_ROUTER_ONLY = ("path", "status", "source", "can_remove", "tags", "aliases")


@lru_cache(maxsize=256)
def _gguf(path: Path, mtime_ns: int, size: int) -> dict[str, Any] | None:
    info = read_info(path)
    return None if info is None else info.as_dict()


def gguf_metadata(path: Path) -> dict[str, Any] | None:
    """The file's GGUF metadata, read once per version of the file (blocking: call it off the loop)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return _gguf(path, st.st_mtime_ns, st.st_size)


def _entry(model: ServedModel, status: str, router_entry: dict[str, Any] | None,
           gguf: dict[str, Any] | None, created: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": model.id, "object": "model", "created": created, "owned_by": "llamacpp"}
    for key, value in (router_entry or {}).items():
        if key not in entry and key not in _ROUTER_ONLY:
            entry[key] = value
    entry["status"] = status
    entry["aliases"] = [name for name in model.names if name != model.id]
    entry["gguf"] = gguf
    return entry


async def entries(backend: Backend, key: KeyEntry | None = None) -> list[dict[str, Any]]:
    """The entry of every served model (several models) that `key` may use (gateway.scopes)."""
    models, router = backend.models, backend.router
    assert models is not None and router is not None
    with contextlib.suppress(UpstreamError):  # else the statuses last seen
        await router.refresh()
    served = [model for model in models.models if model_allowed(key, model.names)]
    infos = await asyncio.to_thread(lambda: [gguf_metadata(m.path) for m in served])
    created = int(time.time())
    return [_entry(model, router.statuses[model.id].value if model.id in router.statuses else "unloaded",
                   router.info.get(model.id), info, created)
            for model, info in zip(served, infos, strict=True)]


def _listing(data: list[dict[str, Any]]) -> Reply:
    return Reply(200, JSON, json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode())


async def model_list(pipeline: Pipeline, ex: Exchange) -> Reply | Refusal:
    """GET /v1/models: the models the caller's key may use. With one model, llama-server's list, unchanged (or
    empty, for a key that may not use that model)."""
    key = ex.caller.entry if ex.caller is not None else None
    backend = pipeline.backend
    if backend.models is not None:
        return _listing(await entries(backend, key))
    if not model_allowed(key, pipeline.names(None)):
        return _listing([])
    return await pipeline.whole("GET", "/v1/models", None, {"X-Request-ID": ex.request_id}, ex.request_id)


def _refused(key: KeyEntry | None, names: tuple[str, ...]) -> Reply | None:
    refused = model_refusal(key, names)
    if refused is None:
        return None
    return Reply(refused.status, JSON, error_body(refused.status, refused.message, refused.code, "model"))


def not_found(requested: str, ids: list[str]) -> Reply:
    message = f"model {requested!r} does not exist; available models: {', '.join(ids)}"
    return Reply(404, JSON, error_body(404, message, "model_not_found", "model"))


async def one_model(pipeline: Pipeline, ex: Exchange) -> Reply | Refusal:
    """GET /v1/models/{id} (the openai client's models.retrieve): `any` is the default model."""
    requested = unquote(ex.path[len(MODEL_PREFIX):])
    backend = pipeline.backend
    models = backend.models
    key = ex.caller.entry if ex.caller is not None else None
    if models is not None:
        model = models.get(models.default if requested == ANY else requested)
        data = await entries(backend, key)
        if model is None:
            return not_found(requested, [entry["id"] for entry in data])
        if (refused := _refused(key, model.names)) is not None:
            return refused
        entry = next(entry for entry in data if entry["id"] == model.id)
        return Reply(200, JSON, json.dumps(entry, separators=(",", ":")).encode())
    if (refused := _refused(key, pipeline.names(None))) is not None:
        return refused
    reply = await pipeline.whole("GET", "/v1/models", None, {"X-Request-ID": ex.request_id}, ex.request_id)
    if not isinstance(reply, Reply) or reply.status != 200:
        return reply
    try:
        data = [e for e in json.loads(reply.body).get("data", []) if isinstance(e, dict)]
    except (ValueError, AttributeError):
        data = []
    for entry in data:
        names = {entry.get("id"), *(entry.get("aliases") or ())}
        if requested == ANY or requested in names or requested + ".gguf" in names:
            return Reply(200, JSON, json.dumps(entry, separators=(",", ":")).encode())
    return not_found(requested, [str(entry.get("id")) for entry in data])
