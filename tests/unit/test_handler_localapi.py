"""handler.localapi: a local API request whose client goes away is cancelled (the e2e test shows the slot freed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from handler.localapi import CancelOnDisconnect, install

SCOPE = {"type": "http", "method": "POST", "path": "/runsync"}


class Client:
    """The server side of one request: its body, then a disconnect when `leave()` is called."""

    def __init__(self, body: bytes) -> None:
        self.messages: list[dict[str, Any]] = [{"type": "http.request", "body": body, "more_body": False}]
        self.left = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.messages:
            return self.messages.pop(0)
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            self.left.set()  # as uvicorn does: receive() answers http.disconnect once the response is complete


async def job_app(scope: dict[str, Any], receive: Any, send: Any, *, seconds: float, log: list[str]) -> None:
    body = (await receive())["body"]
    try:
        await asyncio.sleep(seconds)  # the job generating
    except asyncio.CancelledError:
        log.append("cancelled")
        raise
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
    log.append("answered")


def run(seconds: float, leave_after: float | None) -> tuple[list[str], Client]:
    async def main() -> tuple[list[str], Client]:
        log: list[str] = []
        client = Client(b'{"input": {}}')

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await job_app(scope, receive, send, seconds=seconds, log=log)

        served = asyncio.ensure_future(CancelOnDisconnect(app)(SCOPE, client.receive, client.send))
        if leave_after is not None:
            await asyncio.sleep(leave_after)
            client.left.set()
        await asyncio.wait_for(served, 5)
        return log, client

    return asyncio.run(main())


def test_a_request_whose_client_leaves_is_cancelled() -> None:
    log, client = run(seconds=60, leave_after=0.05)
    assert log == ["cancelled"]
    assert client.sent == []


def test_a_request_answered_is_not_cancelled_and_keeps_its_body() -> None:
    log, client = run(seconds=0.01, leave_after=None)
    assert log == ["answered"]
    assert client.sent[-1]["body"] == b'{"input": {}}'


def test_install_makes_the_sdk_build_its_api_server_with_the_middleware(monkeypatch: pytest.MonkeyPatch) -> None:
    from runpod.serverless.modules import rp_fastapi

    monkeypatch.setattr(rp_fastapi, "WorkerAPI", rp_fastapi.WorkerAPI)  # restored after the test
    sdk_class = rp_fastapi.WorkerAPI
    install()
    install()  # once only
    assert rp_fastapi.WorkerAPI.__mro__[1] is sdk_class
    assert rp_fastapi.WorkerAPI.cancels_on_disconnect
