"""Hosts of their own on one machine: a network namespace per process, joined by a bridge,
so that regions get their own addresses and real partitions (iptables DROP inside a
namespace). Used by the fault tests and the verifier; needs root and iproute2/iptables.

Every name carries a short random tag, so that concurrent runs never share an interface,
a namespace or a subnet, and `close()` deletes everything it made.
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import shutil
import subprocess
from collections.abc import Iterable

COMMAND_TIMEOUT_S = 10.0


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, or iproute2/iptables missing)."""


def unavailable_reason() -> str | None:
    """Why namespaces cannot be used on this machine, or None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 iptables)"
    return None


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if done.returncode != 0:
        raise NetnsUnavailable(f"{' '.join(args)}: {done.stderr.strip()}")


class Network:
    """A bridge on a private /24 and a namespace per host name; the machine itself is the
    bridge's address (`.1`), from which tests reach every host."""

    def __init__(self, hosts: Iterable[str]) -> None:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsUnavailable(reason)
        self.tag = secrets.token_hex(3)
        # 10.200-249.x.0/24: private, and random so that concurrent runs do not collide.
        self.subnet = ipaddress.ip_network(
            f"10.{random.randint(200, 249)}.{random.randint(0, 255)}.0/24"
        )
        self.bridge = f"utb{self.tag}"
        self.gateway = str(self.subnet.network_address + 1)
        self.hosts: dict[str, str] = {}  # host name -> address
        self._namespaces: dict[str, str] = {}
        self._veths: list[str] = []
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _run("ip", "link", "set", self.bridge, "up")
            for index, host in enumerate(hosts):
                self._add_host(index, host)
        except BaseException:
            self.close()
            raise

    def _add_host(self, index: int, host: str) -> None:
        namespace = f"ut-{self.tag}-{host}"
        address = str(self.subnet.network_address + 10 + index)
        outside, inside = f"utv{self.tag}{index}", f"utp{self.tag}{index}"
        _run("ip", "netns", "add", namespace)
        self._namespaces[host] = namespace
        _run("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        self._veths.append(outside)
        _run("ip", "link", "set", inside, "netns", namespace)
        _run("ip", "link", "set", outside, "master", self.bridge)
        _run("ip", "link", "set", outside, "up")
        _run("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", inside)
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", inside, "up")
        _run("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        self.hosts[host] = address

    def prefix(self, host: str) -> list[str]:
        """The command prefix that runs a program on `host`."""
        return ["ip", "netns", "exec", self._namespaces[host]]

    def namespace(self, host: str) -> str:
        """The name of `host`'s namespace (`ip netns` lists it under /var/run/netns)."""
        return self._namespaces[host]

    def partition(self, host: str, others: Iterable[str], both_ways: bool = True) -> None:
        """Cut `host` off from `others`. Both ways: every packet between them is dropped.
        One way: `host` cannot receive, but can still send: the connections the others open
        to it are dropped (every packet of them, in either direction), while the ones it
        opens to them work, answers included (conntrack tells them apart by who opened
        the connection). The machine itself (the bridge address) still reaches `host`:
        clients on its side of the partition."""
        for other in others:
            address = self.hosts[other]
            if both_ways:
                self._iptables(host, "-A", "OUTPUT", "-d", address, "-j", "DROP")
                self._iptables(host, "-A", "INPUT", "-s", address, "-j", "DROP")
                continue
            for chain, side in (("INPUT", "-s"), ("OUTPUT", "-d")):
                # ORIGINAL in INPUT: sent by the opener (the other); REPLY in OUTPUT: the
                # host's answers on a connection the other opened.
                direction = "ORIGINAL" if chain == "INPUT" else "REPLY"
                self._iptables(
                    host,
                    *("-A", chain, side, address, "-m", "conntrack"),
                    *("--ctdir", direction, "-j", "DROP"),
                )

    def heal(self, host: str) -> None:
        self._iptables(host, "-F", "INPUT")
        self._iptables(host, "-F", "OUTPUT")

    def _iptables(self, host: str, *rule: str) -> None:
        _run(*self.prefix(host), "iptables", *rule)

    def close(self) -> None:
        """Delete every namespace, veth and the bridge this network made (best effort:
        each is tried even when another fails)."""
        for namespace in self._namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        for veth in self._veths:
            subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        self._namespaces.clear()
        self._veths.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
