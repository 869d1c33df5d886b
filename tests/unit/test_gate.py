"""The gate middleware in process (aiohttp's test server; the backend is never started)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
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


def _health_request(app: web.Application, remote: str, headers: dict[str, str] | None = None) -> web.Request:
    from unittest import mock

    from aiohttp.test_utils import make_mocked_request

    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (remote, 40000) if name == "peername" else default
    return make_mocked_request("GET", "/health", headers=headers or {}, app=app, transport=transport)


def test_the_backend_log_tail_is_only_shown_to_local_or_keyed_callers(tmp_path: Path) -> None:
    """/health shows llama-server's last log lines while the backend is down: they can quote what others sent."""
    from gateway.health import health

    key = "sk-health-0123456789abcdef"
    (tmp_path / "api_keys.txt").write_text(f"ops:{key}\n")
    (tmp_path / "api_keys.txt").chmod(0o600)
    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_ENABLED": "true"}, probe_roots=[])
    backend = Supervisor(settings)
    backend.last_error = "llama-server exited unexpectedly with code 9"
    backend.last_log_lines = ["prompt: someone else's secret text"]
    app = create_app(settings, backend)

    async def body(remote: str, headers: dict[str, str] | None = None) -> dict:
        import json

        resp = await health(_health_request(app, remote, headers))
        assert resp.status == 503
        return json.loads(resp.body)  # type: ignore[arg-type]

    async def run() -> None:
        assert "log_tail" not in await body("203.0.113.7")
        assert "log_tail" not in await body("203.0.113.7", {"Authorization": "Bearer sk-wrong-0123456789abcdef"})
        assert (await body("203.0.113.7"))["error"] == backend.last_error  # the reason itself is no secret
        assert (await body("203.0.113.7", {"Authorization": f"Bearer {key}"}))["log_tail"] == backend.last_log_lines
        assert (await body("127.0.0.1"))["log_tail"] == backend.last_log_lines
        assert (await body("::1"))["log_tail"] == backend.last_log_lines

    asyncio.run(run())


def test_redis_url_without_auth_is_said_to_be_unused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from gateway.state import SHARED

    settings = Settings.from_env({"DATA_DIR": str(tmp_path), "AUTH_ENABLED": "false",
                                  "REDIS_URL": "redis://:s3cret@127.0.0.1:1/0"}, probe_roots=[])
    with caplog.at_level("WARNING"):
        app = create_app(settings, Supervisor(settings))
    assert SHARED not in app
    assert "REDIS_URL is not used with AUTH_ENABLED=false" in caplog.text and "s3cret" not in caplog.text
