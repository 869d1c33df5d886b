"""CORS, decided once at start-up: the gateway is the only source of these headers (llama-server's own,
which echo any origin, are never passed on).

CORS_ORIGINS empty = off, `*` = any origin, else a comma list of exact origins. Preflights from an allowed origin
get 204 with the requested headers echoed (the OpenAI JS SDK sends x-stainless-* headers); every response to an
allowed origin, errors included, carries Access-Control-Allow-Origin so browsers can read it. Other origins get
no CORS headers at all.
"""

from __future__ import annotations

from aiohttp import web

from gateway.errors import error_response

ALLOW_METHODS = "GET, POST, OPTIONS"
MAX_AGE = "600"
EXPOSE = "X-Request-ID, Retry-After, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset"


class Cors:
    def __init__(self, origins: tuple[str, ...]) -> None:
        self.enabled = bool(origins)
        self.any = "*" in origins
        self.origins = frozenset(origins)

    def allowed(self, origin: str | None) -> bool:
        return bool(origin) and self.enabled and (self.any or origin in self.origins)

    @staticmethod
    def is_preflight(request: web.Request) -> bool:
        return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin")
        if not self.allowed(origin):
            return error_response(403, "this origin is not allowed (CORS_ORIGINS)", "cors_origin_not_allowed")
        assert origin is not None
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Max-Age": MAX_AGE,
            "Vary": "Origin",
        }
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested:
            headers["Access-Control-Allow-Headers"] = requested
        return web.Response(status=204, headers=headers)

    def decorate(self, request: web.Request, response: web.StreamResponse) -> None:
        """Add CORS headers to an answer for an allowed origin. Answers are built by the gateway itself and never
        copy llama-server's headers, so there is nothing of the backend's to strip."""
        origin = request.headers.get("Origin")
        if origin is None or not self.allowed(origin) or self.is_preflight(request):
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSE
        response.headers["Vary"] = "Origin"
