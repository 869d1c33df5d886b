"""The admin routes of several models (MODELS): load, unload, refresh. An admin key only (gateway.auth.require_admin,
the one rule), every action logged with the key id and written to the audit log (gateway.audit), refusals too.

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

from gateway.audit import FAILED, OK, REFUSED
from gateway.auth import ANONYMOUS, Admitted, require_admin
from gateway.errors import error_response
from gateway.proxy import read_body
from gateway.routes import ADMIN_ROUTES
from gateway.state import AUDIT, BACKEND, EXCHANGE
from lifecycle.backend import START_ERRORS
from lifecycle.request_rules import RequestRejected, parse_json_object
from lifecycle.settings import SettingsError
from lifecycle.upstream import UpstreamError

log = logging.getLogger("gateway.admin")
LOAD, UNLOAD, REFRESH = ADMIN_ROUTES
AUDIT_ACTIONS = {LOAD: "model.load", UNLOAD: "model.unload", REFRESH: "models.refresh"}


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


async def audit_refusal(request: web.Request) -> None:
    """The audit line of an admin action the gate refused (gateway.auth.verdict: a key without the admin route
    group): every admin request that gets past the key check has exactly one line, refused ones included."""
    action = AUDIT_ACTIONS.get(request.path) or ("keys.reload" if request.path == "/reload" else None)
    if action is not None:
        await request.app[AUDIT].record(request[EXCHANGE].key_id or ANONYMOUS, action, None, request.remote,
                                        REFUSED, {"status": 403, "reason": "not an admin key"})


async def _audit(request: web.Request, result: str, target: str | None = None, **details: object) -> None:
    """The action's audit line (gateway.audit): who (the key id), what, on which model, from where, and how it
    ended; every admin request that gets past the key check has exactly one."""
    await request.app[AUDIT].record(request[EXCHANGE].key_id or ANONYMOUS, AUDIT_ACTIONS[request.path], target,
                                    request.remote, result, details)


async def _not_now(request: web.Request) -> web.Response | None:
    """The refusal (403, audited as refused) or the unready backend (503, audited as failed), else None."""
    refused = _refused(request)
    if refused is not None:
        await _audit(request, REFUSED, status=refused.status, reason="not an admin key")
        return refused
    unready = _backend_ready(request)
    if unready is not None:
        await _audit(request, FAILED, status=unready.status, reason="backend not ready")
    return unready


def _backend_ready(request: web.Request) -> web.Response | None:
    backend = request.app[BACKEND]
    if backend.ready and backend.router is not None:
        return None
    return error_response(503, f"the model backend is {backend.state.value}; retry shortly", "backend_unavailable",
                          headers={"Retry-After": "5"})


async def load_or_unload(request: web.Request) -> web.Response:
    refused = await _not_now(request)
    if refused is not None:
        return refused
    backend, ex = request.app[BACKEND], request[EXCHANGE]
    try:
        body = parse_json_object(await read_body(request))
        model = backend.choose(body.get("model")) if body.get("model") not in (None, "") else None
        if model is None:
            raise RequestRejected("give the model to act on: {\"model\": \"<id>\"}", "model")
    except RequestRejected as exc:
        await _audit(request, FAILED, status=exc.status, reason=exc.code)  # not the body: the caller wrote it
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
        await _audit(request, FAILED, model.id, status=502, reason="the router did not answer")
        return error_response(502, f"the router did not answer the {action} of {model.id}", "backend_error")
    if code != 200:
        try:
            message = json.loads(answer)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"the router answered {code}"
        await _audit(request, FAILED, model.id, status=409 if code == 400 else 502, router_status=code)
        return error_response(409 if code == 400 else 502, f"{action} {model.id}: {message}", "model_action_failed")
    await _audit(request, OK, model.id, status=200, model_status=status.value)
    return web.json_response({"model": model.id, "action": action, "status": status.value})


async def refresh(request: web.Request) -> web.Response:
    refused = await _not_now(request)
    if refused is not None:
        return refused
    backend, ex = request.app[BACKEND], request[EXCHANGE]
    before = set(backend.models.ids) if backend.models else set()
    try:
        models = await backend.refresh_models()
    except (*START_ERRORS, SettingsError) as exc:
        log.warning("admin: refresh refused: %s", exc)
        await _audit(request, FAILED, status=400, reason="the model list was not changed")
        return error_response(400, f"the model list was not changed: {exc}", "refresh_failed")
    except UpstreamError as exc:
        log.warning("admin: refresh: the router did not reload: %s", exc)
        await _audit(request, FAILED, status=502, reason="the router did not reload")
        return error_response(502, "the router did not reload its model list", "backend_error")
    ids = list(models.ids)
    added, removed = sorted(set(ids) - before), sorted(before - set(ids))
    log.info("admin: refresh by key_id=%s from %s: %d models (added %s, removed %s) (request_id=%s)", ex.key_id,
             request.remote, len(ids), ", ".join(added) or "none", ", ".join(removed) or "none", ex.request_id)
    await _audit(request, OK, status=200, models=len(ids), added=added, removed=removed)
    return web.json_response({"models": ids, "default": models.default, "added": added, "removed": removed})


def add_routes(app: web.Application) -> None:
    app.router.add_post(LOAD, load_or_unload)
    app.router.add_post(UNLOAD, load_or_unload)
    app.router.add_post(REFRESH, refresh)
