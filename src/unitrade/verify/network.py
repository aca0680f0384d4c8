"""Network faults for the verifier and the tests: partitions, slow links, cut connections.

Two modes, chosen at start (`mode`, for the report):

- **namespaces** (root, with ip and iptables): every region and the control plane in a
  network namespace of its own (unitrade/netns.py); a partition is iptables DROP in the
  partitioned server's namespace, both ways or one way;
- **proxy** (anyone): a partition is a stalled link in the proxies (tcpproxy.py), which
  know which server opened each connection.

In both modes every server is advertised at a TCP proxy of ours (`advertise` in the
topology; the server binds `listen`), which adds latency and cuts connections: `tc netem`
does not work on every machine (not on the one CI runs on), a proxy does.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path

from unitrade import netns
from unitrade.cluster import LocalCluster
from unitrade.topology.config import CONTROL_NAME, TopologyConfig, parse_config
from unitrade.verify.setup import free_ports
from unitrade.verify.tcpproxy import Identify, LinkFaults, Proxy, ProxyLoop, socket_owner

NAMESPACES = "namespaces"
PROXY = "proxy"
DELAY_MS_MAX = 10_000


class NetworkFaultsError(RuntimeError):
    pass


def choose_mode() -> str:
    return NAMESPACES if netns.unavailable_reason() is None else PROXY


def server_names(config: TopologyConfig) -> list[str]:
    """The processes a fault can strike: every region and the control plane."""
    if config.control.members:
        raise NetworkFaultsError("network faults support one control plane, not members")
    return [*config.region_names, CONTROL_NAME]


def relocate(text: str, moves: dict[str, tuple[str, str | None]], config: TopologyConfig) -> str:
    """The topology `text` with each named server's `listen` replaced by (listen,
    advertise); every listen must be written `listen = "HOST:PORT"` in the text."""
    for name, (listen, advertise) in moves.items():
        server = config.control.member_list[0] if name == CONTROL_NAME else config.region(name)
        if server.advertise is not None:
            raise NetworkFaultsError(f"{name}: the topology advertises it already")
        pattern = re.compile(r'listen\s*=\s*"' + re.escape(server.listen) + '"')
        replacement = f'listen = "{listen}"'
        if advertise is not None:
            replacement += f'\nadvertise = "{advertise}"'
        text, count = pattern.subn(replacement, text)
        if count != 1:
            raise NetworkFaultsError(f"{name}: listen {server.listen!r} not found once in text")
    return text


def place_in_namespaces(network: netns.Network, text: str, config: TopologyConfig) -> str:
    """The topology with every server at its own host's address (same ports)."""
    moves: dict[str, tuple[str, str | None]] = {
        name: (f"{network.hosts[name]}:{_port(config, name)}", None)
        for name in server_names(config)
    }
    return relocate(text, moves, config)


def namespaced_cluster(
    network: netns.Network, text: str, directory: Path
) -> tuple[LocalCluster, Path]:
    """The topology `text` (servers on 127.0.0.1) with every region and the control plane
    at its own host of `network`, written to DIRECTORY/topology.toml: the (unstarted)
    cluster, each process run in its namespace, and the topology's path. No proxies."""
    text = place_in_namespaces(network, text, parse_config(tomllib.loads(text)))
    path = directory / "topology.toml"
    path.write_text(text)
    config = parse_config(tomllib.loads(text))
    return LocalCluster(config, directory / "data", path, launcher=network.prefix), path


def _port(config: TopologyConfig, name: str) -> int:
    if name == CONTROL_NAME:
        return config.control.member_list[0].port
    return config.region(name).port


class NetworkFaults:
    """One interface over both modes. `cluster()` places a topology (namespaces, proxies)
    and answers the LocalCluster to start; the fault methods act on it; `close()` removes
    everything made (namespaces, veths, bridge, proxies)."""

    def __init__(self, names: Sequence[str], mode: str | None = None) -> None:
        self.mode = mode or choose_mode()
        if self.mode not in (NAMESPACES, PROXY):
            raise NetworkFaultsError(f"mode is {NAMESPACES} or {PROXY}, got {self.mode!r}")
        self.names = list(names)
        self.links = LinkFaults()
        self.network: netns.Network | None = None
        self.placed: LocalCluster | None = None
        self._loops: list[ProxyLoop] = []
        self._blocked_by: dict[str, set[tuple[str, str]]] = {}  # proxy mode partitions
        if self.mode == NAMESPACES:
            self.network = netns.Network(self.names)

    # -- placing a cluster --------------------------------------------------------------

    def cluster(self, text: str, directory: Path) -> tuple[LocalCluster, Path]:
        """Write the topology `text` (servers on 127.0.0.1, as tests write them), moved
        into this network and advertised at proxies, to DIRECTORY/topology.toml, start the
        proxies, and answer the (unstarted) cluster and the topology's path."""
        if self.placed is not None:
            raise NetworkFaultsError("a cluster is placed already: one per NetworkFaults")
        config = parse_config(tomllib.loads(text))
        if sorted(server_names(config)) != sorted(self.names):
            raise NetworkFaultsError(f"the topology's servers are not {self.names}")
        moves: dict[str, tuple[str, str | None]] = {}
        proxies: list[tuple[str, str, int, int]] = []  # name, host, proxy port, server port
        for name in self.names:
            port = _port(config, name)
            if self.network is not None:
                host = self.network.hosts[name]
                # A fresh namespace has every port free: the server moves one over.
                target = port + 1 if port < 65535 else port - 1
            else:
                (target,) = free_ports(1)
                host = "127.0.0.1"
            moves[name] = (f"{host}:{target}", f"{host}:{port}")
            proxies.append((name, host, port, target))
        text = relocate(text, moves, config)
        path = directory / "topology.toml"
        path.write_text(text)
        config = parse_config(tomllib.loads(text))
        launcher = self.network.prefix if self.network is not None else None
        self.placed = LocalCluster(config, directory / "data", path, launcher=launcher)
        self._start_proxies(proxies)
        return self.placed, path

    def start_cluster(self, text: str, directory: Path) -> LocalCluster:
        """cluster(), started and healthy (the caller stops it before close())."""
        cluster, _path = self.cluster(text, directory)
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_proxies(self, proxies: list[tuple[str, str, int, int]]) -> None:
        shared: ProxyLoop | None = None
        for name, host, port, target in proxies:
            if self.network is not None:
                # Beside its server, at its address: iptables in the namespace still sees
                # every peer's own address.
                loop = ProxyLoop(f"/var/run/netns/{self.network.namespace(name)}")
                self._loops.append(loop)
            else:
                if shared is None:
                    shared = ProxyLoop()
                    self._loops.append(shared)
                loop = shared
            loop.add(Proxy(name, (host, port), (host, target), self.links, self._identify(port)))

    def _identify(self, proxy_port: int) -> Identify:
        def identify(host: str, port: int) -> str | None:
            if self.network is not None:
                return {a: n for n, a in self.network.hosts.items()}.get(host)
            cluster = self.placed
            if cluster is None:
                return None
            pids = {n: p.pid for n, p in list(cluster.processes.items()) if p.poll() is None}
            return socket_owner(port, proxy_port, pids)

        return identify

    # -- faults -------------------------------------------------------------------------

    def partition(self, region: str, others: Sequence[str], both_ways: bool = True) -> None:
        """Cut `region` off from `others` (region or control names). One way: it cannot
        receive (their connections to it are dropped) but still sends (its own connections
        to them work). Clients (the tests, the verifier) still reach it."""
        self._known(region, *others)
        if self.network is not None:
            self.network.partition(region, others, both_ways)
            return
        pairs = {(other, region) for other in others}
        if both_ways:
            pairs |= {(region, other) for other in others}
        self._blocked_by.setdefault(region, set()).update(pairs)
        self.links.block(pairs)

    def heal(self, region: str) -> None:
        """Undo every partition made with partition(region, ...)."""
        self._known(region)
        if self.network is not None:
            self.network.heal(region)
            return
        self.links.unblock(self._blocked_by.pop(region, set()))
        for pairs in self._blocked_by.values():  # a pair another partition holds stays
            self.links.block(pairs)

    def slow(self, region: str, delay_ms: int) -> None:
        """Every link `region` is an end of delays each direction by delay_ms."""
        self._known(region)
        if not 0 <= delay_ms <= DELAY_MS_MAX:
            raise ValueError(f"delay_ms is 0..{DELAY_MS_MAX}, got {delay_ms}")
        self.links.set_delay(region, delay_ms / 1000)

    def restore(self, region: str) -> None:
        """The links of `region` fast again."""
        self._known(region)
        self.links.set_delay(region, 0.0)

    def cut(self, region: str) -> int:
        """Reset every connection `region` is an end of, now; how many were cut."""
        self._known(region)
        return sum(loop.cut(region) for loop in self._loops)

    def _known(self, *names: str) -> None:
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise NetworkFaultsError(f"unknown servers {unknown}; known: {self.names}")

    def close(self) -> None:
        """Stop every proxy and remove the namespaces, veths and bridge (each tried even
        when another fails)."""
        try:
            for loop in self._loops:
                loop.close()
        finally:
            self._loops.clear()
            if self.network is not None:
                self.network.close()

    def __enter__(self) -> NetworkFaults:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
