"""The pooled upstream client against a raw HTTP server that closes connections the way llama-server does."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from lifecycle.upstream import Upstream, UpstreamConnectError, UpstreamDisconnected, UpstreamTimeout, UpstreamTooLarge

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


class Served:
    """`async with Server(...) as url`: serves `self.handle` on a free port of 127.0.0.1."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


class RawServer(Served):
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


async def _post(up: Upstream) -> int:
    reply = await up.request("POST", "/v1/chat/completions", body=b"{}", headers={"Content-Type": "application/json"})
    assert reply.body == b'{"ok":true}' and reply.content_type == "application/json"
    return reply.status


def test_stale_pooled_connection_is_retried_once_on_a_fresh_one() -> None:
    async def main() -> None:
        raw = RawServer(drop=lambda conn, index: conn == 0 and index == 1)
        async with raw as url:
            up = Upstream(url, "secret")
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
        try:
            reply = await up.request("GET", "/v1/models")
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
        try:
            task = asyncio.create_task(up.request("GET", "/slow"))
            await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.wait_for(seen_close.wait(), 2)
            assert not up._idle
        finally:
            await up.close()
            server.close()

    asyncio.run(main())


# --- streams -------------------------------------------------------------------------------------------------------

SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class StreamServer(Served):
    """Answers one request with `script(writer)`, and records whether the client closed its side."""

    def __init__(self, script) -> None:  # type: ignore[no-untyped-def]
        self.script = script
        self.requests: list[bytes] = []
        self.client_closed = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        self.requests.append(head + await reader.readexactly(length))
        script = asyncio.create_task(self.script(writer))
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client closes its side
        self.client_closed.set()
        script.cancel()
        writer.close()


def test_stream_pieces_arrive_as_they_are_sent_and_end_cleanly() -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + _chunk(b'data: {"n":1}\n\n'))
        await writer.drain()
        await asyncio.sleep(1.0)
        writer.write(_chunk(b'data: {"n":2}\n\n') + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        server = StreamServer(script)
        async with server as url:
            up = Upstream(url, "sk-backend", stream_idle_timeout=5)
            started = asyncio.get_running_loop().time()
            async with await up.open_stream("POST", "/v1/completions", body=b"{}",
                                            headers={"X-Request-ID": "r1"}) as stream:
                assert stream.status == 200 and stream.content_type == "text/event-stream"
                assert await stream.read() == b'data: {"n":1}\n\n'
                assert asyncio.get_running_loop().time() - started < 0.8  # not held back until the end
                rest = b""
                while piece := await stream.read():
                    rest += piece
                assert rest == b'data: {"n":2}\n\ndata: [DONE]\n\n'
                assert await stream.read() == b""
            request = server.requests[0]
            assert request.startswith(b"POST /v1/completions HTTP/1.1\r\n")
            assert b"Authorization: Bearer sk-backend\r\n" in request and b"X-Request-ID: r1\r\n" in request
            assert request.endswith(b"\r\n\r\n{}")

    asyncio.run(run())


def test_stream_that_goes_idle_times_out_and_closes_the_connection() -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + _chunk(b"data: {}\n\n"))
        await writer.drain()
        await asyncio.sleep(5)

    async def run() -> None:
        server = StreamServer(script)
        async with server as url:
            up = Upstream(url, "k", stream_idle_timeout=0.3)
            stream = await up.open_stream("POST", "/v1/completions", body=b"{}")
            assert await stream.read() == b"data: {}\n\n"
            with pytest.raises(UpstreamTimeout):
                await stream.read()
            await asyncio.wait_for(server.client_closed.wait(), 2)  # the backend sees the connection go

    asyncio.run(run())


def test_stream_broken_off_mid_body_is_an_error_not_an_end() -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + _chunk(b"data: {}\n\n"))
        await writer.drain()
        writer.transport.abort()

    async def run() -> None:
        async with StreamServer(script) as url:
            stream = await Upstream(url, "k").open_stream("POST", "/v1/completions", body=b"{}")
            assert await stream.read() == b"data: {}\n\n"
            with pytest.raises(UpstreamDisconnected) as caught:
                await stream.read()
            assert caught.value.got_bytes

    asyncio.run(run())


def test_stream_closed_early_by_the_caller_closes_the_connection() -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD + _chunk(b"data: {}\n\n"))
        await writer.drain()

    async def run() -> None:
        server = StreamServer(script)
        async with server as url:
            async with await Upstream(url, "k").open_stream("POST", "/v1/completions", body=b"{}") as stream:
                assert await stream.read() == b"data: {}\n\n"
            await asyncio.wait_for(server.client_closed.wait(), 2)

    asyncio.run(run())


def test_stream_refused_before_streaming_is_read_whole() -> None:
    body = b'{"error":{"code":400,"message":"too long"}}'

    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(body), body))
        await writer.drain()

    async def run() -> None:
        async with StreamServer(script) as url:
            stream = await Upstream(url, "k").open_stream("POST", "/v1/completions", body=b"{}")
            assert (stream.status, stream.content_type) == (400, "application/json")
            assert await stream.read_all() == body
            stream.close()

    asyncio.run(run())


def test_stream_to_a_backend_that_is_down_is_a_connect_error() -> None:
    async def run() -> None:
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(UpstreamConnectError):
            await Upstream(f"http://127.0.0.1:{port}", "k").open_stream("POST", "/v1/completions", body=b"{}")

    asyncio.run(run())


def test_stream_whose_backend_never_answers_times_out() -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def run() -> None:
        async with StreamServer(script) as url:
            with pytest.raises(UpstreamTimeout):
                await Upstream(url, "k", stream_idle_timeout=0.3).open_stream("POST", "/v1/completions", body=b"{}")

    asyncio.run(run())


def test_stream_faster_than_its_reader_loses_nothing() -> None:
    """A slow reader makes the client stop reading the socket (flow control); every byte still arrives, in order."""
    events = [b"data: %d %s\n\n" % (i, b"x" * 1000) for i in range(2000)]  # about 2 MB, far past the high water

    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(SSE_HEAD)
        for event in events:
            writer.write(_chunk(event))
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def run() -> None:
        async with StreamServer(script) as url:
            async with await Upstream(url, "k").open_stream("POST", "/v1/completions", body=b"{}") as stream:
                await asyncio.sleep(0.3)  # let the backend get far ahead
                got = b""
                while piece := await stream.read():
                    got += piece
                    await asyncio.sleep(0)
            assert got == b"".join(events)

    asyncio.run(run())


class BigAnswer(Served):
    """Answers every request with `size` bytes, whole (Content-Length) or as one SSE-less chunked body."""

    def __init__(self, size: int, chunked: bool = False) -> None:
        self.size, self.chunked = size, chunked

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length")), 0)
            await reader.readexactly(length)
            body = b"x" * self.size
            if self.chunked:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                for start in range(0, len(body), 65536):
                    piece = body[start:start + 65536]
                    writer.write(b"%x\r\n%b\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                             % (len(body), body))
            await writer.drain()
        writer.close()


def test_a_whole_answer_over_max_response_size_is_dropped_not_buffered() -> None:
    async def main() -> None:
        async with BigAnswer(5_000_000) as url:
            up = Upstream(url, "k", max_response_size=100_000)
            with pytest.raises(UpstreamTooLarge):
                await up.request("POST", "/v1/completions", body=b"{}")
            assert not up._idle  # the connection is out of step: never reused
        async with BigAnswer(50_000) as url:
            reply = await Upstream(url, "k", max_response_size=100_000).request("POST", "/v1/completions", body=b"{}")
            assert len(reply.body) == 50_000

    asyncio.run(main())


def test_a_non_stream_answer_read_whole_from_a_stream_is_capped_too() -> None:
    async def main() -> None:
        async with BigAnswer(1_000_000, chunked=True) as url:
            stream = await Upstream(url, "k").open_stream("POST", "/v1/completions", body=b"{}")
            with pytest.raises(UpstreamTooLarge):
                await stream.read_all(100_000)

    asyncio.run(main())
