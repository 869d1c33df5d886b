"""The pooled upstream client against a raw HTTP server that closes connections the way llama-server does."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from lifecycle.upstream import Upstream

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


class RawServer:
    """Counts request arrivals; `drop(conn_index, request_index)` says which arrivals it closes unanswered."""

    def __init__(self, drop) -> None:  # type: ignore[no-untyped-def]
        self.drop = drop
        self.arrivals = 0
        self.answered = 0
        self.auth: list[str] = []
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        index = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                await reader.readexactly(int(headers.get("Content-Length", "0")))
                self.arrivals += 1
                self.auth.append(headers.get("Authorization", ""))
                if self.drop(conn, index):
                    writer.close()  # closed without reading further or answering: nothing was processed
                    return
                self.answered += 1
                writer.write(RESPONSE)
                await writer.drain()
                index += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


async def _post(up: Upstream) -> int:
    async with await up.request("POST", "/v1/chat/completions", body=b"{}",
                                headers={"Content-Type": "application/json"}) as resp:
        await resp.read()
        return resp.status


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async def main() -> None:
        raw = RawServer(drop=lambda conn, index: conn == 0 and index == 1)
        async with raw as url:
            up = Upstream(url, "secret")
            await up.start()
            try:
                assert await _post(up) == 200
                assert await _post(up) == 200  # reused connection dropped -> sent again on a new one
                assert await _post(up) == 200
            finally:
                await up.close()
        assert raw.answered == 3  # every request processed exactly once
        assert raw.arrivals == 4  # the dropped arrival was never processed
        assert set(raw.auth) == {"Bearer secret"}

    asyncio.run(main())


def test_failure_on_a_new_connection_is_never_retried() -> None:
    async def main() -> None:
        raw = RawServer(drop=lambda conn, index: True)
        async with raw as url:
            up = Upstream(url, "secret")
            await up.start()
            try:
                with pytest.raises(aiohttp.ServerDisconnectedError):
                    await _post(up)
            finally:
                await up.close()
        assert raw.arrivals == 1  # the backend may have read it: never sent twice

    asyncio.run(main())


def test_connection_refused_raises_connector_error() -> None:
    async def main() -> None:
        up = Upstream("http://127.0.0.1:9", "secret", connect_timeout=2)
        await up.start()
        try:
            with pytest.raises(aiohttp.ClientConnectorError):
                await _post(up)
        finally:
            await up.close()

    asyncio.run(main())
