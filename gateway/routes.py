"""The routes the gateway serves, in one table: both lanes, the route table of the aiohttp app, the metrics labels
and the probes read it from here.

- JSON_ROUTES: POST with a JSON object body (lifecycle.request_rules), admitted through the queue, streamed when
  the body says `"stream": true`; both lanes serve them.
- GET_ROUTES: answered by llama-server (or the gateway's model list, gateway.models), never queued; both lanes
  serve them. MODEL_ROUTE (`/v1/models/{id}`) takes the aiohttp lane.
- ADMIN_ROUTES: model load, unload and refresh with several models (gateway.admin): an admin key only.
- PROBES: the gateway's own (gateway.health, gateway.scrape): never queued, still answered while draining, and
  no key needed for /ping and /health (nor /metrics unless METRICS_AUTH_ENABLED).
- The read-only llama-server routes an operator opens with PASSTHROUGH_ROUTES (its safe list, GET only, as
  lifecycle.settings.passthrough_methods decides) are added at start-up; they take the aiohttp lane. Nothing else
  ever reaches llama-server (lifecycle.routes, lifecycle.settings.NEVER_PUBLIC).
"""

from __future__ import annotations

from lifecycle.routes import JSON_ROUTES as _TABLE

JSON_ROUTES = tuple(_TABLE)  # lifecycle.routes: the API surface, shared with serverless mode
GET_ROUTES = ("/v1/models",)
MODEL_ROUTE = "/v1/models/{id}"
ADMIN_ROUTES = ("/admin/models/load", "/admin/models/unload", "/admin/models/refresh")
API_ROUTES = (*JSON_ROUTES, *GET_ROUTES)
PROBES = frozenset({"/ping", "/health", "/metrics"})
ALWAYS_PUBLIC = frozenset({"/ping", "/health"})


_COUNTED = frozenset(JSON_ROUTES)


def counted(path: str) -> bool:
    """Whether a request counts in the API request totals (stats, /health's view of traffic): /v1/ and the
    llama.cpp routes of the table (/tokenize, /infill, /rerank, ...)."""
    return path.startswith("/v1/") or path in _COUNTED
