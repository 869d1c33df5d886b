"""The SDK's local API server (`--rp_serve_api`, or RUNPOD_REALTIME_PORT), stopping a job whose client went away.

runpod 1.12's local API server (`rp_fastapi.WorkerAPI`) runs a job's whole handler inside the HTTP request that
asked for it (`/runsync`, `/stream/{id}`, `/status/{id}`, the realtime `/runsync`) and answers once, at the end.
Neither it nor uvicorn cancels a request whose client has gone, so a client that gave up left the job generating
to its end, holding a llama-server slot for nobody. `CancelOnDisconnect` runs each request in a task of its own
and cancels it when the client disconnects: the CancelledError reaches the job's handler, which closes its
llama-server stream (handler.worker), and llama-server frees the slot, as for a job RunPod stops.

`install()` makes the SDK build its local API server with this middleware: `runpod.serverless.start` creates
`rp_fastapi.WorkerAPI(config)` when it serves the API, so the class it finds there is a subclass that adds it.
The queue worker (the mode RunPod runs) does not use that class at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

log = logging.getLogger("handler")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


class CancelOnDisconnect:
    """ASGI middleware: an HTTP request whose client disconnects before its response is complete is cancelled."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body: list[Message] = []  # the whole request body first (the SDK's bodies are small JSON documents)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body.append(message)
            if not message.get("more_body"):
                break
        gone = asyncio.Event()
        complete = False

        async def replay() -> Message:
            if body:
                return body.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def tracked(message: Message) -> None:
            nonlocal complete
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True

        request = asyncio.ensure_future(self.app(scope, replay, tracked))
        # After the body, the server's receive() returns only once the client has gone (or the response is done).
        watch = asyncio.ensure_future(receive())
        try:
            await asyncio.wait({request, watch}, return_when=asyncio.FIRST_COMPLETED)
            if not request.done() and not complete:
                gone.set()
                request.cancel()
                log.info("%s %s: the client went away, stopped the request", scope.get("method"), scope.get("path"))
                with contextlib.suppress(asyncio.CancelledError):
                    await request
                return
            await request
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
            if not request.done():  # this task itself was cancelled (server shutdown)
                request.cancel()


def install() -> None:
    """From here on, the SDK's local API server is built with CancelOnDisconnect (see the module's docstring)."""
    from runpod.serverless.modules import rp_fastapi

    if getattr(rp_fastapi.WorkerAPI, "cancels_on_disconnect", False):
        return

    class WorkerAPI(rp_fastapi.WorkerAPI):  # type: ignore[misc, name-defined]
        cancels_on_disconnect = True

        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__(config)
            self.rp_app.add_middleware(CancelOnDisconnect)

    rp_fastapi.WorkerAPI = WorkerAPI
