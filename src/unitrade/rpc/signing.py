"""Authentication of region-to-region requests (internal RPC and forwarded client requests).

A request carries `X-Unitrade-From` (the calling region), `X-Unitrade-Ts` (unix seconds) and
`X-Unitrade-Sig`: HMAC-SHA256 with the cluster secret over method, path and query, the time,
the caller and the body's SHA-256. A client that sets these headers itself cannot produce the
signature, so its headers have no effect (DESIGN §14.7). The time window bounds replay.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

FROM_HEADER = "x-unitrade-from"
TS_HEADER = "x-unitrade-ts"
SIG_HEADER = "x-unitrade-sig"
SIGNATURE_WINDOW_S = 30
SIGNED_HEADERS = (FROM_HEADER, TS_HEADER, SIG_HEADER)


def _mac(secret: str, method: str, target: str, ts: str, origin: str, body: bytes) -> str:
    message = "\n".join(
        [method.upper(), target, ts, origin, hashlib.sha256(body).hexdigest()]
    ).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def sign(secret: str, origin: str, method: str, target: str, body: bytes) -> dict[str, str]:
    """Headers proving that region `origin` sent this request (`target` = path?query)."""
    ts = str(int(time.time()))
    return {
        FROM_HEADER: origin,
        TS_HEADER: ts,
        SIG_HEADER: _mac(secret, method, target, ts, origin, body),
    }


def verify(
    secret: str, headers: Mapping[str, str], method: str, target: str, body: bytes
) -> str | None:
    """The signing region if the headers are a valid, fresh signature; otherwise None."""
    origin = headers.get(FROM_HEADER)
    ts = headers.get(TS_HEADER)
    sig = headers.get(SIG_HEADER)
    if not origin or not ts or not sig or not ts.isdigit():
        return None
    if abs(time.time() - int(ts)) > SIGNATURE_WINDOW_S:
        return None
    expected = _mac(secret, method, target, ts, origin, body)
    return origin if hmac.compare_digest(expected, sig) else None
