"""Resolving a forwarded write whose answer was lost (gateway/routing.py runs it).

A write forwarded to its owner that left and got no answer (a timeout, a connection that
dropped after the request left: a frozen or dying owner) may have been applied there.
Rather than answer 504 at once, the gateway sends the same request again, with the same
key, to the owner under the newest rule: at most RESENDS_MAX times within RESOLVE_S of the
loss, with a short backoff. An idempotent replay answers what the first send did, or does
it now, once. Only writes whose repeat is a replay are sent again:

- order creation and checkout name themselves by the body's `idempotency_key`. A forwarded
  one without a key gets one from the gateway before it is first sent (`gw-` and 32 hex
  digits), so that its outcome can be learnt;
- pay (by its `payment_id`), close and refund (repeating the transition an order made
  answers the order) are replays as they stand.

Every other write (cart lines, admin writes) is never sent again: 504 at once. A 5xx
answer to a resend tells only that the resend was not applied, not what the first send
did, so it does not end the resolution; a 2xx or 4xx answer is the answer. When the window
runs out the client gets 504 `outcome_unknown` naming the owner, with the key to retry with.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import orjson
from pydantic import BaseModel

from unitrade.errors import OutcomeUnknown
from unitrade.gateway.forward import FORWARD_CALL

KEY_FIELD = "idempotency_key"
KEY_PREFIX = "gw-"
# The window starts at the loss. The owner answers an order within about CENTER_RESERVE_S
# (services/orders.py) even when the center is slow, so a resend that is not answered
# within this window is not waiting on the center alone.
RESOLVE_S = 5.0
RESENDS_MAX = 3
BACKOFF_S = 0.2  # before the first resend; doubled before each next one


@dataclass(frozen=True)
class Resend:
    """How a forwarded write may be sent again after its answer was lost. `keyed`: the body
    model whose `idempotency_key` names the request (the gateway adds one when the client
    gave none); None: the request as it stands is a replay when repeated."""

    keyed: type[BaseModel] | None = None


@dataclass
class Lost:
    """A forwarded write whose answer was lost, being resolved."""

    region: str  # the owner that did not answer
    window_s: float
    until: float = 0.0  # monotonic: the end of the resolution window
    resends: int = 0

    def __post_init__(self) -> None:
        self.until = time.monotonic() + self.window_s

    def next_backoff(self) -> float | None:
        """How long to wait before the next resend; None when none is left."""
        backoff = BACKOFF_S * (1 << self.resends)
        if self.resends >= RESENDS_MAX or time.monotonic() + backoff >= self.until:
            return None
        return backoff

    def left_s(self) -> float:
        return max(0.0, self.until - time.monotonic())


def new_key() -> str:
    return KEY_PREFIX + uuid.uuid4().hex


def keyed_body(body: bytes) -> tuple[bytes, str] | None:
    """`body` with an idempotency key, and the key: the client's own, or a new one added.
    None when the body is not a JSON object with a string or null key: the owner refuses
    it as it is, and it is never sent again."""
    data: object = {}
    if body.strip():
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(data, dict):
        return None
    key = data.get(KEY_FIELD)
    if isinstance(key, str):
        return body, key
    if key is not None:
        return None
    key = new_key()
    data[KEY_FIELD] = key
    return orjson.dumps(data), key


def unresolved(lost: Lost, key: str | None) -> OutcomeUnknown:
    """The 504 of a lost answer that resending did not resolve."""
    retry = (
        f"send it again with idempotency_key {key!r} to learn what became of it"
        if key is not None
        else "send it again as it was (it is idempotent) to learn what became of it"
    )
    details: dict[str, object] = {"region": lost.region, "call": FORWARD_CALL}
    if key is not None:
        details["idempotency_key"] = key
    resends = f"{lost.resends} resend{'' if lost.resends == 1 else 's'}"
    return OutcomeUnknown(
        f"forwarding to owner region {lost.region}: no answer, nor to {resends} within "
        f"{lost.window_s:g} s; the request may have been applied: {retry}",
        **details,
    )
