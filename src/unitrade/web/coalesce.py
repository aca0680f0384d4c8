"""One send per HTTP response: uvicorn's protocol with a response's head and body coalesced.

uvicorn writes a response's status line and headers, then its body, each with a write of
its own. On a socket with TCP_NODELAY (uvloop sets it) that is two segments, and the
reader is woken twice: for a forwarded request, the gateway's client wakes on the owner's
head, then again on its body, and the buyer's client the same on the gateway's answer.
On a machine whose cores the regions share, each wake-up is a switch of process; a
profile of forwarded orders (docs/benchmarks.md, "The forwarding hop") showed uvicorn's
`send` among the largest leaves of the owner and the gateway. Here the head is held until
the body's first write and both leave in one send. Nothing waits for it: if no body write
follows in the same turn of the event loop (a streamed response still computing its first
chunk), the head leaves on its own at the end of that turn.

Why a wrapper of the transport rather than a copy of uvicorn's protocol: the change is a
few lines and uvicorn's parsing, flow control and keep-alive stay uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

STATUS_PREFIX = b"HTTP/1.1 "
HEAD_END = b"\r\n\r\n"
# A head this large or larger is sent at once: holding it could only save a copy.
HEAD_BYTES_HELD_MAX = 16 * 1024


class CoalescingTransport:
    """The connection's transport, except that a response head waits for the body's first
    write (at most until the end of the current turn of the event loop)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held + bytes(data))
            return
        if _is_head(data):
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
            return
        self._transport.write(data)

    def flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        # Everything else (is_closing, get_extra_info, pause_reading, abort, ...) is the
        # transport's own.
        return getattr(self._transport, name)


def _is_head(data: bytes | bytearray | memoryview) -> bool:
    return (
        isinstance(data, bytes)
        and len(data) < HEAD_BYTES_HELD_MAX
        and data.startswith(STATUS_PREFIX)
        and data.endswith(HEAD_END)
    )


class CoalescingHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a CoalescingTransport (uvicorn.Config's `http`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        wrapped = CoalescingTransport(transport, self.loop)
        super().connection_made(wrapped)  # type: ignore[arg-type]
