"""Bearer tokens: an HMAC-SHA256-signed subject, `ut1.<subject>.<signature>`.

The subject is `b<buyer_id>` for a buyer or `admin`. Tokens are signed with the cluster
secret, so every region verifies every token without a lookup.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from unitrade.errors import Unauthorized
from unitrade.topology.rule import BUYER_ID_MAX

PREFIX = "ut1"
TOKEN_LENGTH_MAX = 200


@dataclass(frozen=True)
class Principal:
    buyer_id: int | None  # None for the admin
    admin: bool


def _signature(secret: str, subject: str) -> str:
    mac = hmac.new(secret.encode(), f"{PREFIX}.{subject}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def issue_token(secret: str, buyer_id: int | None = None, admin: bool = False) -> str:
    assert admin != (buyer_id is not None), "a token is for one buyer or for the admin"
    if buyer_id is not None and not 1 <= buyer_id <= BUYER_ID_MAX:
        raise ValueError("buyer IDs are positive 63-bit integers")
    subject = "admin" if admin else f"b{buyer_id}"
    return f"{PREFIX}.{subject}.{_signature(secret, subject)}"


def read_authorization(secret: str, header: str | None) -> Principal:
    if not header:
        raise Unauthorized("missing Authorization: Bearer <token>")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token or len(token) > TOKEN_LENGTH_MAX:
        raise Unauthorized("Authorization must be: Bearer <token>")
    prefix, _, rest = token.strip().partition(".")
    subject, _, signature = rest.partition(".")
    if prefix != PREFIX or not hmac.compare_digest(signature, _signature(secret, subject)):
        raise Unauthorized("invalid token")
    if subject == "admin":
        return Principal(buyer_id=None, admin=True)
    digits = subject[1:]
    if subject.startswith("b") and digits.isdigit() and 1 <= int(digits) <= BUYER_ID_MAX:
        return Principal(buyer_id=int(digits), admin=False)
    raise Unauthorized("invalid token")
