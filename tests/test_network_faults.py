"""Network faults (unitrade/verify/network.py, tcpproxy.py): the proxy adds the latency it
is told and cuts connections in flight; a partition makes a region unreachable from the
others (one way: it still reaches them) and healed reachable again, in proxy mode and, as
root, in namespaces mode."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support import Api, free_ports, topology_toml
from tests.switch_support import Control, buyers_of_cell
from tests.test_partition import CartWriter
from unitrade.netns import unavailable_reason
from unitrade.topology.config import CONTROL_NAME, default_config
from unitrade.verify.network import NAMESPACES, PROXY, NetworkFaults
from unitrade.verify.tcpproxy import LinkFaults, Proxy, ProxyLoop

SLOW_HOLD_S = 5.0


class _Upstream(BaseHTTPRequestHandler):
    """/fast answers at once; /slow tells the test it has the request, then answers after
    SLOW_HOLD_S (a request in flight for a cut to strike)."""

    in_flight = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/slow":
            type(self).in_flight.set()
            time.sleep(SLOW_HOLD_S)
        body = b"ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def proxied() -> Iterator[tuple[str, LinkFaults, ProxyLoop]]:
    """A real HTTP server behind one proxy (named `sh`); the proxy's URL."""
    _Upstream.in_flight = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    faults = LinkFaults()
    loop = ProxyLoop()
    port = free_ports(1)[0]
    target = ("127.0.0.1", server.server_address[1])
    try:
        loop.add(Proxy("sh", ("127.0.0.1", port), target, faults, lambda _h, _p: None))
        yield f"http://127.0.0.1:{port}", faults, loop
    finally:
        loop.close()
        server.shutdown()
        server.server_close()


def _fastest(client: httpx.Client, url: str, n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        assert client.get(url).status_code == 200
        times.append(time.perf_counter() - start)
    return min(times)


def test_the_proxy_adds_the_latency_it_is_told(
    proxied: tuple[str, LinkFaults, ProxyLoop],
) -> None:
    url, faults, _loop = proxied
    with httpx.Client(timeout=10.0) as client:
        base = _fastest(client, url + "/fast")
        faults.set_delay("sh", 0.08)
        slow = _fastest(client, url + "/fast")
        faults.set_delay("sh", 0.0)
        again = _fastest(client, url + "/fast")
    # The request and its answer each wait 80 ms: the fastest of five rises by 160 ms at
    # least (a lower bound: a busy machine only adds to it).
    assert slow >= base + 0.16, (base, slow)
    assert again < slow, (again, slow)


def test_a_cut_connection_is_seen_by_its_client(
    proxied: tuple[str, LinkFaults, ProxyLoop],
) -> None:
    url, _faults, loop = proxied
    failure: list[BaseException] = []

    def request() -> None:
        try:
            with httpx.Client(timeout=30.0) as client:
                client.get(url + "/slow")
        except httpx.HTTPError as exc:
            failure.append(exc)

    client = threading.Thread(target=request)
    started = time.monotonic()
    client.start()
    assert _Upstream.in_flight.wait(10), "the request never reached the server"
    assert loop.cut("sh") == 1  # struck in flight: the server holds the request
    client.join(30)
    assert not client.is_alive()
    assert failure and isinstance(failure[0], httpx.TransportError), failure
    # Seen at the cut, not at the server's answer.
    assert time.monotonic() - started < SLOW_HOLD_S


def _modes() -> list[object]:
    reason = unavailable_reason()
    skip = pytest.mark.skip(reason=f"no network namespaces: {reason}")
    return [PROXY, pytest.param(NAMESPACES, marks=[skip] if reason else [])]


def _forwarded(api: Api, at: str, buyer: int) -> int:
    """The status of a buyer's cart read at `at`, a region that forwards it to the owner of
    the buyer's cell; 0 when no answer came in time."""
    try:
        return api.call(at, "GET", "/v1/cart", buyer).status_code
    except httpx.TimeoutException:
        return 0


def _fastest_forward(api: Api, at: str, buyer: int, n: int = 3) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        assert _forwarded(api, at, buyer) == 200
        times.append(time.perf_counter() - start)
    return min(times)


@pytest.mark.parametrize("mode", _modes())
def test_a_partitioned_region_is_unreachable_from_the_others_until_healed(
    mode: str, tmp_path: Path
) -> None:
    names = [*default_config().region_names, CONTROL_NAME]
    with NetworkFaults(names, mode) as faults:
        assert faults.mode == mode
        cluster, _path = faults.cluster(topology_toml(free_ports(4)), tmp_path)
        config = cluster.config
        at_sh = buyers_of_cell(config, 3, 1)[0]  # u3: owned by sh
        at_hz = buyers_of_cell(config, 1, 1)[0]  # u1: owned by hz
        with cluster, Api(config) as api:
            cluster.start()
            assert config.region("sh").base_url != f"http://{config.region('sh').listen}"
            assert _forwarded(api, "hz", at_sh) == 200
            assert _forwarded(api, "sh", at_hz) == 200

            # A slow sh: hz's forwarded request and its answer each wait 100 ms (against
            # 0.2 s, not a measured base plus 0.2 s: on a busy machine the base is noise).
            faults.slow("sh", 100)
            assert _fastest_forward(api, "hz", at_sh) >= 0.2
            faults.restore("sh")
            assert _fastest_forward(api, "hz", at_sh) < 0.2
            # hz keeps its connection to sh open between forwards: a cut resets it, and the
            # next forward opens a new one.
            assert faults.cut("sh") >= 1
            _wait(lambda: _forwarded(api, "hz", at_sh) == 200, 10, "no forward after the cut")

            # One way: sh can send (its reads at hz answer) but not receive.
            faults.partition("sh", [n for n in names if n != "sh"], both_ways=False)
            assert _forwarded(api, "sh", at_hz) == 200
            assert _forwarded(api, "hz", at_sh) != 200
            # Clients on the machine's side still reach sh itself.
            assert api.call("sh", "GET", "/v1/cart", at_sh).status_code == 200

            faults.heal("sh")
            faults.partition("sh", ["hz", "bj", CONTROL_NAME])
            assert _forwarded(api, "sh", at_hz) != 200
            assert _forwarded(api, "bj", at_sh) != 200

            faults.heal("sh")
            deadline = time.monotonic() + 30
            while _forwarded(api, "hz", at_sh) != 200 or _forwarded(api, "sh", at_hz) != 200:
                assert time.monotonic() < deadline, "still unreachable after the heal"
                time.sleep(0.2)


def test_in_proxy_mode_an_isolated_region_loses_its_write_lease_and_regains_it(
    tmp_path: Path,
) -> None:
    """The proxies tell the servers apart: the region's lease renewals to the control plane
    stall with the partition, so its writes stop within its lease, and start again when
    healed."""
    names = [*default_config().region_names, CONTROL_NAME]
    with NetworkFaults(names, PROXY) as faults:
        cluster = faults.start_cluster(topology_toml(free_ports(4)), tmp_path)
        config = cluster.config
        with cluster, Api(config) as api, Control(config) as control:
            for n in range(50):
                body = {"title": "t", "price_cents": 100, "stock": 1000}
                answer = api.call("hz", "PUT", f"/v1/admin/products/PT-{n}", body=body)
                assert answer.status_code == 200, answer.text
            control.wait_connected()
            writer = CartWriter(api, buyers_of_cell(config, 3, 1)[0])  # u3, owned by sh
            writer.start()
            try:
                _wait(lambda: len(writer.acked) >= 20, 20, writer.refusals[-3:])
                faults.partition("sh", ["hz", "bj", CONTROL_NAME])
                cut = time.monotonic()
                _wait(lambda: _refused(writer, "no_write_lease"), 15, "sh still writes")
                assert [a for a in writer.acked if a[0] > cut], "no write in flight at the cut"
                last = max(a[0] for a in writer.acked)
                assert last - cut < config.control.lease_ms / 1000 + 0.5
                faults.heal("sh")
                healed = time.monotonic()
                _wait(lambda: writer.acked[-1][0] > healed, 30, "sh writes no more")
            finally:
                writer.stop()
    # Nothing is left listening: every proxy's and server's port can be listened on again
    # (as servers do, past the closed connections' TIME_WAIT).
    servers = [*config.regions, config.control]
    for port in [s.port for s in servers] + [int(s.advertised.split(":")[1]) for s in servers]:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()


def _refused(writer: CartWriter, error: str) -> bool:
    return any(r.get("error") == error for r in list(writer.refusals))


def _wait(done: Callable[[], bool], timeout_s: float, what: object) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
