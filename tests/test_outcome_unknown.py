"""What a client is told when the owner region does not answer: a connection refused
means nothing reached it (503 region_unavailable, safe to retry); a request that left and
got no answer may have been applied (504 outcome_unknown), never a 503 that promises
nothing was written."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tests.support import free_ports, topology_toml
from unitrade.errors import OutcomeUnknown, RegionUnavailable
from unitrade.gateway.forward import Forwarder
from unitrade.rpc.client import RegionClient
from unitrade.topology.config import parse_config
from unitrade.topology.rule import initial_rule
from unitrade.topology.rule_view import RuleView

REQUEST_TIMEOUT_S = 0.5
WAIT_S_MAX = 10.0


def _config(ports: list[int]):  # type: ignore[no-untyped-def]
    import tomllib

    return parse_config(tomllib.loads(topology_toml(ports)))


async def _silent_owner(
    port: int, received: asyncio.Event, released: asyncio.Event
) -> asyncio.Server:
    """An owner that reads the whole request and answers nothing until released (a frozen
    region)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        received.set()
        await asyncio.wait_for(released.wait(), WAIT_S_MAX)
        writer.close()
        await writer.wait_closed()

    return await asyncio.start_server(handle, "127.0.0.1", port)


@pytest.mark.parametrize(
    ("method", "expected"), [("POST", OutcomeUnknown), ("GET", RegionUnavailable)]
)
def test_a_request_that_left_and_got_no_answer_is_outcome_unknown(
    method: str, expected: type[Exception]
) -> None:
    ports = free_ports(4)
    config = _config(ports)

    async def scenario() -> None:
        received, released = asyncio.Event(), asyncio.Event()
        server = await _silent_owner(config.region("sh").port, received, released)
        client = RegionClient(config, "hz", request_timeout_s=REQUEST_TIMEOUT_S)
        forwarder = Forwarder(RuleView("gateway", initial_rule(config)), "hz", client)
        try:
            with pytest.raises(expected) as refused:
                await asyncio.wait_for(
                    forwarder.send(method, "/v1/cart", {}, b"", "sh"), WAIT_S_MAX
                )
            assert received.is_set()  # the request did reach the owner before the timeout
            assert refused.value.status == (504 if method == "POST" else 503)
            assert refused.value.details["region"] == "sh"
        finally:
            await client.aclose()
            released.set()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_a_refused_connection_is_region_unavailable() -> None:
    ports = free_ports(4)
    config = _config(ports)
    with socket.socket() as probe:  # nothing listens on sh's port
        assert probe.connect_ex(("127.0.0.1", config.region("sh").port)) != 0

    async def scenario() -> None:
        client = RegionClient(config, "hz", request_timeout_s=REQUEST_TIMEOUT_S)
        forwarder = Forwarder(RuleView("gateway", initial_rule(config)), "hz", client)
        try:
            with pytest.raises(RegionUnavailable) as refused:
                await forwarder.send("POST", "/v1/orders", {}, b"{}", "sh")
            assert refused.value.status == 503 and "unreachable" in refused.value.message
        finally:
            await client.aclose()

    asyncio.run(scenario())
