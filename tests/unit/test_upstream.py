"""The pooled upstream client against a raw HTTP server that closes connections the way llama-server does."""

from __future__ import annotations

import asyncio

import pytest

from lifecycle.upstream import Upstream, UpstreamConnectError, UpstreamDisconnected

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
    reply = await up.fetch("POST", "/v1/chat/completions", body=b"{}", headers={"Content-Type": "application/json"})
    assert reply.body == b'{"ok":true}' and reply.content_type == "application/json"
    return reply.status


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
                with pytest.raises(UpstreamDisconnected):
                    await _post(up)
            finally:
                await up.close()
        assert raw.arrivals == 1  # the backend may have read it: never sent twice

    asyncio.run(main())


def test_connection_refused_raises_connect_error() -> None:
    async def main() -> None:
        up = Upstream("http://127.0.0.1:9", "secret", connect_timeout=2)
        await up.start()
        try:
            with pytest.raises(UpstreamConnectError):
                await _post(up)
        finally:
            await up.close()

    asyncio.run(main())


def test_connections_are_reused_while_fresh() -> None:
    async def main() -> None:
        raw = RawServer(drop=lambda conn, index: False)
        async with raw as url:
            up = Upstream(url, "secret")
            await up.start()
            try:
                for _ in range(5):
                    assert await _post(up) == 200
            finally:
                await up.close()
        assert raw.connections == 1 and raw.answered == 5

    asyncio.run(main())


def test_chunked_answers_are_read_whole() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "k")
        await up.start()
        try:
            reply = await up.fetch("GET", "/v1/models")
            assert (reply.status, reply.body) == (200, b'{"a":1}')
        finally:
            await up.close()
            server.close()

    asyncio.run(main())


def test_cancelled_request_closes_its_connection() -> None:
    """A client that leaves mid-request must not leave a half-read connection in the pool."""
    closed = asyncio.Event

    async def main() -> None:
        seen_close = closed()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await reader.read()  # never answers; returns at EOF when the client closes
            seen_close.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        up = Upstream(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", "k")
        await up.start()
        try:
            task = asyncio.create_task(up.fetch("GET", "/slow"))
            await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.wait_for(seen_close.wait(), 2)
            assert not up._idle
        finally:
            await up.close()
            server.close()

    asyncio.run(main())
