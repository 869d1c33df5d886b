"""The one pooled keep-alive client to llama-server, shared by the gateway and the serverless handler.

llama-server closes keep-alive connections after 5 s idle. Two defences, so a stale pooled connection never
fails a user's request and a generation is never sent twice:
1. The pool forgets idle connections sooner than the backend does (KEEPALIVE_TIMEOUT < 5 s).
2. If a request sent on a *reused* connection fails before any response byte arrives (the backend closed it
   while our request was on its way), it is sent once more on a brand-new connection. A request that
   failed on a new connection is never retried: the backend may have read it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp

KEEPALIVE_TIMEOUT = 3.0
_STALE_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


async def _on_reuse(_session: aiohttp.ClientSession, ctx: SimpleNamespace, _params: Any) -> None:
    ctx.trace_request_ctx["reused"] = True


class Upstream:
    def __init__(self, base_url: str, api_key: str, *, connect_timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = f"Bearer {api_key}"
        self.connect_timeout = connect_timeout
        self._pooled: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None

    def _session(self, **connector: Any) -> aiohttp.ClientSession:
        trace = aiohttp.TraceConfig()
        trace.on_connection_reuseconn.append(_on_reuse)
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, **connector),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            trace_configs=[trace],
        )

    async def start(self) -> None:
        self._pooled = self._session(keepalive_timeout=KEEPALIVE_TIMEOUT)
        self._fresh = self._session(force_close=True)

    async def close(self) -> None:
        for session in (self._pooled, self._fresh):
            if session is not None:
                await session.close()
        self._pooled = self._fresh = None

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": self.auth}
        if extra:
            headers.update(extra)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> aiohttp.ClientResponse:
        """Send one request; the caller reads and releases the response (`async with`)."""
        assert self._pooled is not None and self._fresh is not None, "Upstream.start() was not awaited"
        url = self.base_url + path
        sent_headers = self.headers(headers)
        ctx: dict[str, bool] = {}
        kwargs: dict[str, Any] = {"data": body, "headers": sent_headers, "trace_request_ctx": ctx}
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            return await self._pooled.request(method, url, **kwargs)
        except aiohttp.ClientConnectorError:
            raise  # could not even connect: nothing was sent
        except _STALE_ERRORS:
            if not ctx.get("reused"):
                raise
        kwargs["trace_request_ctx"] = {}
        return await self._fresh.request(method, url, **kwargs)
