"""The routes the gateway serves, in one table: both lanes, the route table of the aiohttp app, the metrics labels
and the probes read it from here.

- JSON_ROUTES: POST with a JSON object body (lifecycle.request_rules), admitted through the queue, streamed when
  the body says `"stream": true`; both lanes serve them.
- GET_ROUTES: answered by llama-server, never queued; both lanes serve them.
- PROBES: the gateway's own (gateway.health, gateway.scrape): never queued, still answered while draining, and
  no key needed for /ping and /health (nor /metrics unless METRICS_AUTH_ENABLED).
- The llama-server routes an operator opens with PASSTHROUGH_ROUTES (GET-only or GET and POST, as
  lifecycle.settings.passthrough_methods decides) are added at start-up; they take the aiohttp lane.
"""

from __future__ import annotations

JSON_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
GET_ROUTES = ("/v1/models",)
API_ROUTES = (*JSON_ROUTES, *GET_ROUTES)
PROBES = frozenset({"/ping", "/health", "/metrics"})
ALWAYS_PUBLIC = frozenset({"/ping", "/health"})


def counted(path: str) -> bool:
    """Whether a request counts in the API request totals (stats, /health's view of traffic)."""
    return path.startswith("/v1/")
