"""Authentication of region-to-region requests (internal RPC, forwarded client requests, and
calls between the regions, the CLI and the control plane).

A request carries `X-Unitrade-From` (the caller), `X-Unitrade-To` (the region it is meant
for), `X-Unitrade-Ts` (unix seconds), `X-Unitrade-Nonce` and `X-Unitrade-Sig`: HMAC-SHA256
over the method, path and query, all of those, the body's SHA-256 and every header that
changes what the request means (the buyer's token, the rule version it was routed under,
the content type). So a client that sets these headers itself cannot produce the
signature; a captured request cannot be sent to another region (the destination is
signed), altered (every meaningful header is signed) or replayed (the receiver keeps every
nonce for the signature window and refuses one seen before; an older timestamp is refused
outright).

Calls with the control plane are signed with the control secret, calls between regions
with the region secret: the receiver picks the secret by the claimed sender.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping

FROM_HEADER = "x-unitrade-from"
TO_HEADER = "x-unitrade-to"
TS_HEADER = "x-unitrade-ts"
NONCE_HEADER = "x-unitrade-nonce"
SIG_HEADER = "x-unitrade-sig"
SIGNATURE_WINDOW_S = 30
NONCES_MAX = 500_000  # about 16,000 signed requests a second for the whole window
SIGNED_HEADERS = (FROM_HEADER, TO_HEADER, TS_HEADER, NONCE_HEADER, SIG_HEADER)
# Headers whose value changes what a request means: covered by the signature when present.
COVERED_HEADERS = ("authorization", "content-type", "x-unitrade-rule-version")

SecretOf = Callable[[str], str | None]  # the secret a sender signs with; None: unknown sender


def _mac(
    secret: str,
    method: str,
    target: str,
    fields: tuple[str, str, str, str],
    headers: Mapping[str, str],
    body: bytes,
) -> str:
    covered = [f"{name}:{headers.get(name, '')}" for name in COVERED_HEADERS]
    message = "\n".join(
        [method.upper(), target, *fields, *covered, hashlib.sha256(body).hexdigest()]
    )
    # surrogateescape: a header decoded as latin-1 or holding any bytes still encodes.
    return hmac.new(
        secret.encode(), message.encode("utf-8", "surrogateescape"), hashlib.sha256
    ).hexdigest()


def sign(
    secret: str,
    origin: str,
    destination: str,
    method: str,
    target: str,
    body: bytes,
    headers: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Headers proving that `origin` sent this request to `destination` (`target` =
    path?query); `headers` are the request's own, of which the covered ones are signed."""
    ts = str(int(time.time()))
    nonce = secrets.token_hex(12)
    fields = (ts, origin, destination, nonce)
    return {
        FROM_HEADER: origin,
        TO_HEADER: destination,
        TS_HEADER: ts,
        NONCE_HEADER: nonce,
        SIG_HEADER: _mac(secret, method, target, fields, headers or {}, body),
    }


class Verifier:
    """Checks signatures of requests meant for `destination`, once each."""

    def __init__(self, destination: str, secret_of: SecretOf, nonces_max: int = NONCES_MAX):
        self.destination = destination
        self.secret_of = secret_of
        self.nonces_max = nonces_max
        self._seen: set[str] = set()
        self._expiring: collections.deque[tuple[float, str]] = collections.deque()
        self.replays_refused = 0

    def verify(
        self, headers: Mapping[str, str], method: str, target: str, body: bytes
    ) -> str | None:
        """The sender if the headers are a valid, fresh, first-seen signature for this
        destination; otherwise None."""
        origin = headers.get(FROM_HEADER)
        destination = headers.get(TO_HEADER)
        ts = headers.get(TS_HEADER)
        nonce = headers.get(NONCE_HEADER)
        sig = headers.get(SIG_HEADER)
        if not origin or not ts or not nonce or not sig or not ts.isdigit():
            return None
        if destination != self.destination or len(nonce) > 64:
            return None
        now = time.time()
        if abs(now - int(ts)) > SIGNATURE_WINDOW_S:
            return None
        secret = self.secret_of(origin)
        if secret is None:
            return None
        expected = _mac(secret, method, target, (ts, origin, destination, nonce), headers, body)
        if not hmac.compare_digest(expected.encode(), sig.encode("utf-8", "surrogateescape")):
            return None
        return origin if self._first_use(nonce, now) else None

    def _first_use(self, nonce: str, now: float) -> bool:
        while self._expiring and self._expiring[0][0] < now:
            self._seen.discard(self._expiring.popleft()[1])
        if nonce in self._seen:
            self.replays_refused += 1
            return False
        if len(self._seen) >= self.nonces_max:
            # Only holders of a secret can fill this; refusing keeps the bound and the
            # sender retries (its next request has a new nonce).
            return False
        self._seen.add(nonce)
        # Kept until its timestamp could no longer pass the window, from either side.
        self._expiring.append((now + 2 * SIGNATURE_WINDOW_S, nonce))
        return True
