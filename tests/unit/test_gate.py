"""The gate middleware in process (aiohttp's test server; the backend is never started)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from lifecycle.settings import Settings
from lifecycle.supervisor import Supervisor


def test_an_unexpected_error_is_an_openai_shaped_500_with_the_request_id(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_ENABLED": "false"}, probe_roots=[])
    app = create_app(settings, Supervisor(settings))

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_get("/v1/broken", broken)

    async def run() -> None:
        async with TestClient(TestServer(app)) as client:
            resp = await client.get("/v1/broken", headers={"X-Request-ID": "bug-1"})
            assert resp.status == 500
            assert resp.headers["X-Request-ID"] == "bug-1"
            error = (await resp.json())["error"]
            assert error["code"] == "internal_error" and "a bug" not in error["message"]
            metrics = await (await client.get("/metrics")).json()
            assert metrics["requests_error"] == 1

    asyncio.run(run())
