"""Bearer tokens: `ut2.<key id>.<subject>.<expires>.<token id>.<signature>`.

The subject is `b<buyer_id>` for a buyer or `admin`; `expires` is unix seconds; the token
id names the token for revocation; the signature is HMAC-SHA256 with the key the key id
names, over everything before it. Every region verifies every token without a lookup: the
keys are in the topology (`[secrets] token_keys`), several at once during a rotation, and
revoked token ids are a set each region holds in memory (services/revocations.py).

Every malformed credential is a 401 `unauthorized`, whatever bytes it holds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass

from unitrade.errors import Unauthorized
from unitrade.topology.config import TokenKey
from unitrade.topology.rule import BUYER_ID_MAX

PREFIX = "ut2"
TOKEN_LENGTH_MAX = 200
TTL_S_MAX = 30 * 86_400  # a revocation is kept this long at most (services/revocations.py)
BUYER_TTL_S_DEFAULT = 86_400
ADMIN_TTL_S_DEFAULT = 3_600
_TOKEN = re.compile(
    r"ut2\.([a-z0-9][a-z0-9-]{0,15})\.(admin|b[1-9][0-9]{0,18})\.([0-9]{1,12})"
    r"\.([0-9a-f]{16})\.([A-Za-z0-9_-]{43})"
)


@dataclass(frozen=True)
class Principal:
    buyer_id: int | None  # None for the admin
    admin: bool


@dataclass(frozen=True)
class TokenClaims:
    principal: Principal
    key_id: str
    expires_s: int
    token_id: str


def _signature(secret: str, signed: str) -> str:
    mac = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def issuing_key(keys: Sequence[TokenKey]) -> TokenKey:
    return next(k for k in keys if k.accept_until is None)


def issue_token(
    keys: Sequence[TokenKey],
    buyer_id: int | None = None,
    admin: bool = False,
    ttl_s: int | None = None,
    now_s: float | None = None,
) -> str:
    if admin == (buyer_id is not None):
        raise ValueError("a token is for one buyer or for the admin")
    if buyer_id is not None and not 1 <= buyer_id <= BUYER_ID_MAX:
        raise ValueError("buyer IDs are positive 63-bit integers")
    ttl_s = ttl_s if ttl_s is not None else (ADMIN_TTL_S_DEFAULT if admin else BUYER_TTL_S_DEFAULT)
    if not 1 <= ttl_s <= TTL_S_MAX:
        raise ValueError(f"a token lives 1 s to {TTL_S_MAX // 86_400} days")
    key = issuing_key(keys)
    subject = "admin" if admin else f"b{buyer_id}"
    expires_s = int(now_s if now_s is not None else time.time()) + ttl_s
    signed = f"{PREFIX}.{key.id}.{subject}.{expires_s}.{secrets.token_hex(8)}"
    return f"{signed}.{_signature(key.secret, signed)}"


def read_claims(
    keys: Sequence[TokenKey], token: str, now_s: float | None = None, expired_ok: bool = False
) -> TokenClaims:
    """The claims of a valid token; Unauthorized for anything else (never another error)."""
    found = _TOKEN.fullmatch(token) if len(token) <= TOKEN_LENGTH_MAX else None
    if found is None:
        raise Unauthorized("invalid token")
    key_id, subject, expires, token_id, signature = found.groups()
    now = now_s if now_s is not None else time.time()
    key = next((k for k in keys if k.id == key_id), None)
    if key is None or (key.accept_until is not None and now > key.accept_until):
        raise Unauthorized("invalid token: its key is unknown or retired")
    signed = token[: -len(signature) - 1]
    # Both sides are ASCII here (the pattern matched): compare_digest cannot raise.
    if not hmac.compare_digest(signature, _signature(key.secret, signed)):
        raise Unauthorized("invalid token")
    if now > int(expires) and not expired_ok:
        raise Unauthorized("token expired")
    if subject == "admin":
        principal = Principal(buyer_id=None, admin=True)
    else:
        buyer = int(subject[1:])
        if buyer > BUYER_ID_MAX:
            raise Unauthorized("invalid token")
        principal = Principal(buyer_id=buyer, admin=False)
    return TokenClaims(principal, key_id, int(expires), token_id)


def read_authorization(
    keys: Sequence[TokenKey], header: str | None, revoked: Container[str] = ()
) -> Principal:
    if not header:
        raise Unauthorized("missing Authorization: Bearer <token>")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Authorization must be: Bearer <token>")
    claims = read_claims(keys, token.strip())
    if claims.token_id in revoked:
        raise Unauthorized("token revoked")
    return claims.principal


def token_reader(
    keys: Sequence[TokenKey], revoked: Container[str] = ()
) -> Callable[[str | None], Principal]:
    """What a server checks bearer tokens with."""
    frozen = list(keys)
    return lambda header: read_authorization(frozen, header, revoked)
