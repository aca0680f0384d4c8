"""A TCP proxy that stands in front of one server of a cluster (a region or the control
plane) and injects link faults: latency per direction, stalled links (a partition: bytes
held, as a DROP would, not refused) and cut connections (reset at once).

Every server is advertised at its proxy (`advertise` in the topology), so that every
connection to it passes through one. A proxy knows the sender of a connection (the server
that opened it, or None for a client) through `identify`, and asks the shared `LinkFaults`
before each chunk it forwards. Proxies run on an asyncio loop in a thread of their own
(`ProxyLoop`), which may enter a network namespace first (namespaces mode: the proxy of a
region runs beside it, at its address, so that iptables still sees the peers' addresses).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

CONNECTIONS_MAX = 1024  # per proxy: a client that never closes cannot exhaust the machine
QUEUE_CHUNKS = 64  # read ahead per direction while a chunk waits for its latency
CHUNK = 65_536
STALL_POLL_S = 0.02
DELAY_MAX_S = 10.0
START_TIMEOUT_S = 10.0
CLONE_NEWNET = 0x40000000

Identify = Callable[[str, int], str | None]  # (peer host, peer port) -> sender name


class LinkFaults:
    """What is wrong with the links now, shared by every proxy (read from their loops,
    changed from the caller's thread: each change replaces a whole immutable value)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blocked: frozenset[tuple[str, str]] = frozenset()  # (sender, receiver)
        self.delays: dict[str, float] = {}  # server name -> one-way delay (s)

    def block(self, pairs: set[tuple[str, str]]) -> None:
        with self._lock:
            self.blocked = self.blocked | pairs

    def unblock(self, pairs: set[tuple[str, str]]) -> None:
        with self._lock:
            self.blocked = self.blocked - pairs

    def set_delay(self, name: str, delay_s: float) -> None:
        if not 0 <= delay_s <= DELAY_MAX_S:
            raise ValueError(f"a delay is 0..{DELAY_MAX_S:g} s, got {delay_s}")
        with self._lock:
            delays = dict(self.delays)
            if delay_s:
                delays[name] = delay_s
            else:
                delays.pop(name, None)
            self.delays = delays

    def is_blocked(self, sender: str | None, receiver: str) -> bool:
        return sender is not None and (sender, receiver) in self.blocked

    def delay_s(self, sender: str | None, receiver: str) -> float:
        """A slow server is slow on every link it is an end of."""
        delays = self.delays
        return max(delays.get(sender or "", 0.0), delays.get(receiver, 0.0))


@dataclass(eq=False)
class _Connection:
    sender: str | None
    receiver: str
    transports: list[asyncio.BaseTransport] = field(default_factory=list)

    def abort(self) -> None:
        for transport in self.transports:
            transport.abort()  # type: ignore[attr-defined]


class Proxy:
    """Listens at `listen` for the server `name` and forwards every connection to
    `target`."""

    def __init__(
        self,
        name: str,
        listen: tuple[str, int],
        target: tuple[str, int],
        faults: LinkFaults,
        identify: Identify,
    ) -> None:
        self.name = name
        self.listen = listen
        self.target = target
        self.faults = faults
        self.identify = identify
        self.connections: set[_Connection] = set()
        self.accepted = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.listen[0], self.listen[1], reuse_address=True
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.cut(None)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self, name: str | None) -> int:
        """Reset every connection `name` is an end of (every one with None); how many."""
        cut = [c for c in self.connections if name in (None, c.sender, c.receiver)]
        for connection in cut:
            connection.abort()
        return len(cut)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.connections) >= CONNECTIONS_MAX:
            writer.transport.abort()
            return
        peer = writer.get_extra_info("peername")
        sender = self.identify(peer[0], peer[1]) if peer else None
        connection = _Connection(sender, self.name, [writer.transport])
        self.connections.add(connection)
        self.accepted += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                return  # the server is down: the client sees its connection reset
            connection.transports.append(up_writer.transport)
            pumps = [
                asyncio.create_task(self._pump(connection, reader, up_writer)),
                asyncio.create_task(self._pump(connection, up_reader, writer)),
            ]
            done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            if any(task.exception() is not None for task in done):
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self.connections.discard(connection)
            connection.abort()

    async def _pump(
        self,
        connection: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Forward one direction: each chunk leaves its delay after it arrived (so latency
        adds to every chunk without limiting throughput), and waits while the link is
        blocked."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)

        async def read() -> None:
            while True:
                data = await reader.read(CHUNK)
                delay = self.faults.delay_s(connection.sender, connection.receiver)
                await queue.put((loop.time() + delay, data))
                if not data:
                    return

        reading = asyncio.create_task(read())
        try:
            while True:
                if reading.done():
                    reading.result()  # a read error ends the pump
                    due, data = await queue.get()  # the end (b"") is queued last
                else:
                    getting = asyncio.create_task(queue.get())
                    await asyncio.wait([getting, reading], return_when=asyncio.FIRST_COMPLETED)
                    if not getting.done():
                        getting.cancel()
                        continue
                    due, data = getting.result()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                # Polled: the faults change from another thread, where an asyncio.Event
                # cannot be set.
                while self.faults.is_blocked(  # noqa: ASYNC110
                    connection.sender, connection.receiver
                ):
                    await asyncio.sleep(STALL_POLL_S)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        finally:
            reading.cancel()


class ProxyLoop:
    """An asyncio loop in a thread of its own for some proxies; with `namespace` (a path
    under /var/run/netns) the thread enters that network namespace first, so that the
    proxies' sockets are made in it."""

    def __init__(self, namespace: str | None = None) -> None:
        self.proxies: dict[str, Proxy] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(namespace,), name="unitrade-proxy", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"the proxy loop did not start: {self._error}")

    def _run(self, namespace: str | None) -> None:
        try:
            if namespace is not None:
                _enter_namespace(namespace)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    def add(self, proxy: Proxy) -> None:
        asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(START_TIMEOUT_S)
        self.proxies[proxy.name] = proxy

    def cut(self, name: str) -> int:
        async def cut() -> int:
            return sum(proxy.cut(name) for proxy in self.proxies.values())

        return asyncio.run_coroutine_threadsafe(cut(), self._loop).result(START_TIMEOUT_S)

    def close(self) -> None:
        if self._thread.is_alive():

            async def stop() -> None:
                await asyncio.gather(*(p.stop() for p in self.proxies.values()))
                # What the cuts left (pumps winding down) ends here, not with the loop.
                tasks = asyncio.all_tasks() - {asyncio.current_task()}
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(START_TIMEOUT_S)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(START_TIMEOUT_S)
        if not self._thread.is_alive():
            self._loop.close()
        self.proxies.clear()


def _enter_namespace(path: str) -> None:
    """setns(2) for the calling thread only (os.setns arrives with Python 3.12)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns {path}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def socket_owner(peer_port: int, local_port: int, pids: dict[str, int]) -> str | None:
    """Which of `pids` (name -> pid) holds the TCP socket at local port `peer_port`
    connected to `local_port` on this machine: the sender of a loopback connection, read
    from /proc (the socket's inode, then the processes' descriptors)."""
    inode = _socket_inode(peer_port, local_port)
    if inode is None:
        return None
    wanted = f"socket:[{inode}]"
    for name, pid in pids.items():
        try:
            descriptors = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in descriptors:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == wanted:
                    return name
            except OSError:
                continue
    return None


def _socket_inode(port: int, remote_port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as lines:
                next(lines, None)
                for line in lines:
                    fields = line.split()
                    local, remote, inode = fields[1], fields[2], fields[9]
                    if (
                        int(local.rpartition(":")[2], 16) == port
                        and int(remote.rpartition(":")[2], 16) == remote_port
                    ):
                        return inode
        except OSError:
            continue
    return None
