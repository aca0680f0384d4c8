"""One send per response: the head waits for the body's first write, never longer than
the current turn of the event loop (web/coalesce.py)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route

from tests.support import free_ports
from unitrade.web.coalesce import CoalescingHttpProtocol, CoalescingTransport


class Recorder(asyncio.Transport):
    """What reaches the socket: each write as one element."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sent.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"


async def _head_and_body_leave_in_one_write() -> None:
    recorder = Recorder()
    transport = CoalescingTransport(recorder, asyncio.get_running_loop())
    transport.write(HEAD)
    assert recorder.sent == []
    transport.write(b"hello")
    assert recorder.sent == [HEAD + b"hello"]
    await asyncio.sleep(0)  # the end-of-turn flush finds nothing held
    assert recorder.sent == [HEAD + b"hello"]


async def _a_head_alone_leaves_at_the_end_of_the_turn() -> None:
    recorder = Recorder()
    transport = CoalescingTransport(recorder, asyncio.get_running_loop())
    transport.write(HEAD)
    await asyncio.sleep(0)
    assert recorder.sent == [HEAD]


async def _close_sends_a_held_head_first_and_other_writes_pass() -> None:
    recorder = Recorder()
    transport = CoalescingTransport(recorder, asyncio.get_running_loop())
    transport.write(b"not a head")
    transport.write(HEAD)
    transport.close()
    assert recorder.sent == [b"not a head", HEAD] and recorder.closed


def serve_app(port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    async def plain(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("x" * 100)

    async def streamed(_request: Request) -> StreamingResponse:
        async def chunks():  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.01)
            yield b"first"
            await asyncio.sleep(0.01)
            yield b"second"

        return StreamingResponse(chunks())

    app = Starlette(routes=[Route("/plain", plain), Route("/streamed", streamed)])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=CoalescingHttpProtocol, log_level="warning"
    )
    server = uvicorn.Server(config)
    return server, asyncio.ensure_future(server.serve())


# struct tcp_info (linux/tcp.h): tcpi_data_segs_in, the segments with data received.
TCP_INFO_DATA_SEGS_IN_OFFSET = 152


def data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, TCP_INFO_DATA_SEGS_IN_OFFSET)[0])


async def fetch(port: int, path: str) -> tuple[bytes, int]:
    """The response (the socket read until closed) and how many segments carried it."""
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    reads: list[bytes] = []
    try:
        request = f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
        await loop.sock_sendall(sock, request)
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(sock, 65536):
                reads.append(chunk)
        segments = data_segments_in(sock)
    finally:
        sock.close()
    return b"".join(reads), segments


async def _a_real_server_answers_head_and_body_in_one_segment() -> None:
    port = free_ports(1)[0]
    server, task = serve_app(port)
    try:
        async with asyncio.timeout(10):
            while not server.started:  # noqa: ASYNC110 (uvicorn offers no event)
                await asyncio.sleep(0.01)
        answer, segments = await fetch(port, "/plain")
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"x" * 100)
        assert segments == 1  # head and body left in one send
        # A streamed response still gets its head before its first chunk is ready.
        streamed, segments = await fetch(port, "/streamed")
        assert b"first" in streamed and b"second" in streamed and segments >= 2
    finally:
        server.should_exit = True
        await task


def test_head_and_body_leave_in_one_write() -> None:
    asyncio.run(_head_and_body_leave_in_one_write())


def test_a_head_alone_leaves_at_the_end_of_the_turn() -> None:
    asyncio.run(_a_head_alone_leaves_at_the_end_of_the_turn())


def test_close_sends_a_held_head_first_and_other_writes_pass() -> None:
    asyncio.run(_close_sends_a_held_head_first_and_other_writes_pass())


@pytest.mark.cluster
def test_a_real_server_answers_head_and_body_in_one_segment() -> None:
    asyncio.run(_a_real_server_answers_head_and_body_in_one_segment())
