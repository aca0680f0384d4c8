"""What a client is told when the owner region does not answer: a connection refused
means nothing reached it (503 region_unavailable, safe to retry); a request that left and
got no answer may have been applied (504 outcome_unknown), never a 503 that promises
nothing was written."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson
import pytest

from tests.support import free_ports, topology_toml
from unitrade.errors import OutcomeUnknown, RegionUnavailable
from unitrade.gateway.forward import Forwarder
from unitrade.gateway.hold import Holds
from unitrade.gateway.models import CreateOrder
from unitrade.gateway.resend import KEY_FIELD, Resend, keyed_body
from unitrade.gateway.routing import Caller, Dispatcher, Passage
from unitrade.rpc.client import RegionClient, Unanswered, Unreachable
from unitrade.topology.config import parse_config
from unitrade.topology.rule import Route, initial_rule
from unitrade.topology.rule_view import RuleView
from unitrade.web.tokens import Principal

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


# -- the RPC client tells a call that never left from one whose answer was lost ----------


def test_a_call_tells_unreachable_from_unanswered() -> None:
    ports = free_ports(4)
    config = _config(ports)

    async def scenario() -> None:
        client = RegionClient(config, "hz")
        try:
            with pytest.raises(Unreachable):  # nothing listens on sh's port
                await client.call("sh", "POST", "/internal/center/step", {}, timeout_s=2.0)
            received, released = asyncio.Event(), asyncio.Event()
            server = await _silent_owner(config.region("sh").port, received, released)
            try:
                with pytest.raises(Unanswered) as lost:
                    # All the attempts within timeout_s, not one request timeout each.
                    await asyncio.wait_for(
                        client.call("sh", "POST", "/internal/center/step", {}, timeout_s=0.5),
                        WAIT_S_MAX,
                    )
                assert received.is_set() and lost.value.details["region"] == "sh"
            finally:
                released.set()
                server.close()
                await server.wait_closed()
        finally:
            await client.aclose()

    asyncio.run(scenario())


# -- the gateway resolves a lost answer by resending with the same key -------------------


def test_keyed_body_keeps_the_clients_key_and_adds_one_where_none() -> None:
    assert keyed_body(b'{"items": [], "idempotency_key": "mine"}') == (
        b'{"items": [], "idempotency_key": "mine"}',
        "mine",
    )
    for body in (b'{"items": [1]}', b'{"items": [1], "idempotency_key": null}'):
        keyed = keyed_body(body)
        assert keyed is not None
        added, key = keyed
        assert key.startswith("gw-") and orjson.loads(added) == {"items": [1], KEY_FIELD: key}
    empty = keyed_body(b"")  # a checkout without a body
    assert empty is not None and orjson.loads(empty[0]) == {KEY_FIELD: empty[1]}
    for refused in (b"{not json", b"[1, 2]", b'{"idempotency_key": 3}'):
        assert keyed_body(refused) is None  # the owner refuses it as it is


class _Owner:
    """An owner region on a socket: it reads every request whole, and answers none of the
    first `silent` (a frozen region), then 201 echoing the request's body."""

    def __init__(self, silent: int) -> None:
        self.silent = silent
        self.bodies: list[bytes] = []
        self.released = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
        self.bodies.append(body)
        if len(self.bodies) <= self.silent:
            await asyncio.wait_for(self.released.wait(), WAIT_S_MAX)
        else:
            writer.write(
                b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
                + f"content-length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        writer.close()


def _dispatch(config: Any, resend: Resend | None, resolve_s: float) -> tuple[Dispatcher, Passage]:
    client = RegionClient(config, "hz", request_timeout_s=REQUEST_TIMEOUT_S)
    view = RuleView("gateway", initial_rule(config))
    dispatcher = Dispatcher("hz", view, Holds(view, 2_000, 10), Forwarder(view, "hz", client))
    dispatcher.resolve_s = resolve_s
    who = Caller(Principal(buyer_id=40, admin=False), forwarded_from=None)
    headers = {"content-type": "application/json", "authorization": "Bearer x"}
    body = b'{"items": [{"sku": "A", "qty": 1}]}'
    deadline = dispatcher.holds.deadline()
    return dispatcher, Passage("POST", "/v1/orders", headers, body, who, deadline, {}, resend)


async def _serve(config: Any, owner: _Owner) -> asyncio.Server:
    return await asyncio.start_server(owner.handle, "127.0.0.1", config.region("sh").port)


def test_a_lost_answer_is_resolved_by_the_same_request_with_the_same_key() -> None:
    config = _config(free_ports(4))

    async def scenario() -> None:
        owner = _Owner(silent=1)
        server = await _serve(config, owner)
        dispatcher, passage = _dispatch(config, Resend(keyed=CreateOrder), 5.0)
        try:
            response = await asyncio.wait_for(
                dispatcher.run(passage, lambda _rule: Route(3, "sh"), None), WAIT_S_MAX
            )
            assert response is not None and response.status_code == 201
            first, second = owner.bodies  # the lost send, then the resend that answered
            assert first == second and orjson.loads(first)[KEY_FIELD] == passage.key
            assert passage.key is not None and passage.key.startswith("gw-")
            forwarder = dispatcher.forwarder
            assert (forwarder.lost, forwarder.resent, forwarder.resolved) == (1, 1, 1)
            assert forwarder.unknown == 0
        finally:
            await dispatcher.forwarder.client.aclose()
            owner.released.set()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


@pytest.mark.parametrize("resend", [Resend(keyed=CreateOrder), None])
def test_an_unresolved_lost_answer_is_504_and_a_write_without_a_key_is_never_resent(
    resend: Resend | None,
) -> None:
    config = _config(free_ports(4))

    async def scenario() -> None:
        owner = _Owner(silent=100)
        server = await _serve(config, owner)
        dispatcher, passage = _dispatch(config, resend, 1.5)
        try:
            with pytest.raises(OutcomeUnknown) as unknown:
                await asyncio.wait_for(
                    dispatcher.run(passage, lambda _rule: Route(3, "sh"), None), WAIT_S_MAX
                )
            body = unknown.value.body()
            assert body["region"] == "sh" and body["call"] == "forward"
            assert dispatcher.forwarder.unknown == 1
            if resend is None:
                assert len(owner.bodies) == 1 and "idempotency_key" not in body
                return
            assert len(owner.bodies) >= 2  # sent, then sent again
            assert {orjson.loads(b)[KEY_FIELD] for b in owner.bodies} == {body[KEY_FIELD]}
        finally:
            await dispatcher.forwarder.client.aclose()
            owner.released.set()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
