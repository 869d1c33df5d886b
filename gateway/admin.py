"""The admin routes of several models (MODELS): load, unload, refresh. An admin key only (gateway.auth.require_admin,
the one rule), every action logged with the key id.

    POST /admin/models/load     {"model": "<id, file name or alias>"}   load it now (the least recently used
                                                                        model is unloaded at MODELS_MAX)
    POST /admin/models/unload   {"model": "..."}                        unload it (its memory freed)
    POST /admin/models/refresh                                          look again at MODELS_DIR and MODELS_PRESET

They answer JSON: `{"model": id, "status": ...}`, or for refresh `{"models": [ids], "added": [...], "removed": [...]}`;
errors are OpenAI-shaped (403 admin_key_required, 404 model_not_found, 400 for a bad body, 502/503 from the router).
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from gateway.auth import Admitted, require_admin
from gateway.errors import error_response
from gateway.proxy import read_body
from gateway.routes import ADMIN_ROUTES
from gateway.state import BACKEND, EXCHANGE
from lifecycle.backend import START_ERRORS
from lifecycle.request_rules import RequestRejected, parse_json_object
from lifecycle.settings import SettingsError
from lifecycle.upstream import UpstreamError

log = logging.getLogger("gateway.admin")
LOAD, UNLOAD, REFRESH = ADMIN_ROUTES


def _refused(request: web.Request) -> web.Response | None:
    ex = request[EXCHANGE]
    caller = ex.caller if ex.caller is not None else Admitted(ex.key_id or "anonymous", None)
    refused = require_admin(caller)
    if refused is None:
        return None
    ex.rejected = "auth"
    log.warning("admin action %s refused: key_id=%s is not an admin key (request_id=%s)", request.path,
                ex.key_id, ex.request_id)
    return error_response(refused.status, refused.message, refused.code)


def _backend_ready(request: web.Request) -> web.Response | None:
    backend = request.app[BACKEND]
    if backend.ready and backend.router is not None:
        return None
    return error_response(503, f"the model backend is {backend.state.value}; retry shortly", "backend_unavailable",
                          headers={"Retry-After": "5"})


async def load_or_unload(request: web.Request) -> web.Response:
    refused = _refused(request) or _backend_ready(request)
    if refused is not None:
        return refused
    backend, ex = request.app[BACKEND], request[EXCHANGE]
    try:
        body = parse_json_object(await read_body(request))
        model = backend.choose(body.get("model")) if body.get("model") not in (None, "") else None
        if model is None:
            raise RequestRejected("give the model to act on: {\"model\": \"<id>\"}", "model")
    except RequestRejected as exc:
        return error_response(exc.status, str(exc), exc.code, param=exc.param)
    router = backend.router
    assert router is not None
    action = "load" if request.path == LOAD else "unload"
    log.info("admin: %s model %s by key_id=%s from %s (request_id=%s)", action, model.id, ex.key_id,
             request.remote, ex.request_id)
    try:
        code, answer = await (router.load(model.id) if action == "load" else router.unload(model.id))
        status = await router.status(model.id, fresh=True)
    except UpstreamError as exc:
        log.warning("admin: %s %s failed: %s", action, model.id, exc)
        return error_response(502, f"the router did not answer the {action} of {model.id}", "backend_error")
    if code != 200:
        try:
            message = json.loads(answer)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"the router answered {code}"
        return error_response(409 if code == 400 else 502, f"{action} {model.id}: {message}", "model_action_failed")
    return web.json_response({"model": model.id, "action": action, "status": status.value})


async def refresh(request: web.Request) -> web.Response:
    refused = _refused(request) or _backend_ready(request)
    if refused is not None:
        return refused
    backend, ex = request.app[BACKEND], request[EXCHANGE]
    before = set(backend.models.ids) if backend.models else set()
    try:
        models = await backend.refresh_models()
    except (*START_ERRORS, SettingsError) as exc:
        log.warning("admin: refresh refused: %s", exc)
        return error_response(400, f"the model list was not changed: {exc}", "refresh_failed")
    except UpstreamError as exc:
        log.warning("admin: refresh: the router did not reload: %s", exc)
        return error_response(502, "the router did not reload its model list", "backend_error")
    ids = list(models.ids)
    added, removed = sorted(set(ids) - before), sorted(before - set(ids))
    log.info("admin: refresh by key_id=%s from %s: %d models (added %s, removed %s) (request_id=%s)", ex.key_id,
             request.remote, len(ids), ", ".join(added) or "none", ", ".join(removed) or "none", ex.request_id)
    return web.json_response({"models": ids, "default": models.default, "added": added, "removed": removed})


def add_routes(app: web.Application) -> None:
    app.router.add_post(LOAD, load_or_unload)
    app.router.add_post(UNLOAD, load_or_unload)
    app.router.add_post(REFRESH, refresh)
