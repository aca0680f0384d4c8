"""The forwarding hop: a client request sent once, signed, to the owner region of its cell.

The request is signed by this region (rpc/signing.py), so the owner knows it was forwarded
and refuses it (`wrong_region`) instead of forwarding it again. Where to send it, and when to
send it again, is decided by gateway/routing.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping

import aiohttp
import orjson
from starlette.responses import Response

from unitrade.errors import OutcomeUnknown, RegionUnavailable
from unitrade.flow.breaker import BreakerBoard
from unitrade.rpc.client import RegionClient, Reply, never_sent
from unitrade.topology.rule_view import RuleView

FORWARDED_BY_HEADER = "x-unitrade-forwarded-by"
# The rule version the forwarding gateway routed under. A receiver whose rule is older
# waits (within its hold) for the newer one before refusing as not the owner: the rule
# reaches regions a few ms apart, and a switch should not turn that into refusals.
RULE_VERSION_HEADER = "x-unitrade-rule-version"
PASSED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
PASSED_RESPONSE_HEADERS = (
    "content-type",
    "x-unitrade-region",
    "x-unitrade-served-by",
    "retry-after",
    "idempotent-replayed",
)
# The `call` of an error body when the forwarding hop failed (services/remote.py names its
# own, `center`): which call failed, with `region` the region that did not answer.
FORWARD_CALL = "forward"
# Answers that mean "nothing was applied; the rule moved under this request": a fence
# refused the write (the cell is banned, or the region is no longer its owner).
RETRYABLE = {421: "wrong_region", 503: "write_banned"}


def _failed_hop(_exc: BaseException) -> bool:
    return True  # send raises only when the owner gave no answer


def _failed_reply(reply: Reply) -> bool:
    """An answer that counts against the forwarding breaker: the owner failed to serve
    (500). Its typed refusals, 503s included (a ban, its own overload or breakers), are
    answers of a region that works."""
    return reply.status == 500


class Forwarder:
    def __init__(
        self,
        view: RuleView,
        region: str,
        client: RegionClient,
        breakers: BreakerBoard | None = None,
    ) -> None:
        self.view = view
        self.region = region
        self.client = client
        self.breakers = breakers
        self.forwarded = 0  # requests this region sent on to an owner
        self.retried = 0  # forwarded requests sent again after a rule change
        # Lost answers (gateway/resend.py): forwarded writes that left and got no answer,
        # resends of them, those a resend answered, and 504 outcome_unknown answered.
        self.lost = 0
        self.resent = 0
        self.resolved = 0
        self.unknown = 0
        self.keys_added = 0  # forwarded writes given an idempotency key by this gateway

    async def send(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        owner: str,
        timeout_s: float | None = None,
        guarded: bool = True,
    ) -> Reply:
        """One hop to `owner` (one more try if the connection was never made), through
        the breaker of forwarding to it unless `guarded` is False: CircuitOpen (503, before
        anything is sent) while it is open. RegionUnavailable when nothing reached the
        owner; OutcomeUnknown when a write may have (gateway/routing.py resends it where
        that is safe)."""

        def hop() -> Awaitable[Reply]:
            return self._send(method, target, headers, body, owner, timeout_s)

        if self.breakers is None or not guarded:
            return await hop()
        breaker = self.breakers.get(owner, FORWARD_CALL)
        return await breaker.run(hop, _failed_hop, _failed_reply)

    async def _send(
        self,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        owner: str,
        timeout_s: float | None,
    ) -> Reply:
        passed = {h: headers[h] for h in PASSED_REQUEST_HEADERS if h in headers}
        passed[RULE_VERSION_HEADER] = str(self.view.rule.version)
        try:
            try:
                reply = await self.client.send(owner, method, target, body, passed, timeout_s)
            except (aiohttp.ClientError, TimeoutError) as exc:
                if not never_sent(exc):
                    raise
                # Nothing reached the owner, so one more try cannot apply the request twice.
                reply = await self.client.send(owner, method, target, body, passed, timeout_s)
        except (aiohttp.ClientError, TimeoutError) as exc:
            if never_sent(exc):
                raise RegionUnavailable(
                    f"forwarding to owner region {owner} failed: it is unreachable "
                    f"({type(exc).__name__}); nothing was sent",
                    region=owner,
                    call=FORWARD_CALL,
                ) from exc
            # The request may have reached the owner: a write may have been applied, and
            # a 503 would promise that it was not.
            if is_write(method):
                raise OutcomeUnknown(
                    f"forwarding to owner region {owner}: no answer ({type(exc).__name__}); "
                    "the request may have been applied: repeat it as it was (with the same "
                    "idempotency key or payment ID) to learn its outcome",
                    region=owner,
                    call=FORWARD_CALL,
                ) from exc
            raise RegionUnavailable(
                f"forwarding to owner region {owner}: no answer ({type(exc).__name__})",
                region=owner,
                call=FORWARD_CALL,
            ) from exc
        self.forwarded += 1
        return reply

    def response(self, reply: Reply) -> Response:
        out = {h: reply.headers[h] for h in PASSED_RESPONSE_HEADERS if h in reply.headers}
        out[FORWARDED_BY_HEADER] = self.region
        return Response(content=reply.body, status_code=reply.status, headers=out)


def is_write(method: str) -> bool:
    return method not in ("GET", "HEAD", "OPTIONS")


def error_code(body: bytes) -> str | None:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return data.get("error") if isinstance(data, dict) else None
