"""Bearer tokens (expiry, key ids, rotation, revocation) and region signatures (destination,
covered headers, nonces): every malformed credential is refused cleanly, never raised."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unitrade.errors import Unauthorized
from unitrade.rpc.signing import NONCE_HEADER, SIGNED_HEADERS, Verifier, sign
from unitrade.topology.config import (
    SECRET_DEFAULT,
    DevelopmentSecret,
    TokenKey,
    check_production,
    default_config,
)
from unitrade.web.tokens import TTL_S_MAX, issue_token, read_authorization, read_claims

OLD = TokenKey(id="k1", secret="old-secret-0123456789")
NEW = TokenKey(id="k2", secret="new-secret-0123456789")


def bearer(token: str) -> str:
    return f"Bearer {token}"


def test_a_token_names_its_subject_key_and_expiry() -> None:
    now = 1_800_000_000
    token = issue_token([NEW], buyer_id=42, ttl_s=600, now_s=now)
    claims = read_claims([NEW], token, now_s=now + 1)
    assert claims.principal.buyer_id == 42 and not claims.principal.admin
    assert claims.key_id == "k2" and claims.expires_s == now + 600
    admin = read_claims([NEW], issue_token([NEW], admin=True, now_s=now), now_s=now)
    assert admin.principal.admin and admin.expires_s == now + 3600  # admin default: 1 h
    with pytest.raises(Unauthorized, match="expired"):
        read_claims([NEW], token, now_s=now + 601)
    with pytest.raises(ValueError):
        issue_token([NEW], buyer_id=42, ttl_s=TTL_S_MAX + 1)


def test_keys_rotate_with_a_grace_period() -> None:
    now = time.time()
    old_token = issue_token([OLD], buyer_id=7)
    retiring = TokenKey(id="k1", secret=OLD.secret, accept_until=int(now) + 60)
    rotated = [NEW, retiring]
    assert read_claims(rotated, old_token).key_id == "k1"  # still accepted
    assert read_claims(rotated, issue_token(rotated, buyer_id=7)).key_id == "k2"  # new ones
    with pytest.raises(Unauthorized, match="retired"):
        read_claims(rotated, old_token, now_s=now + 61)
    with pytest.raises(Unauthorized):
        read_claims([NEW], old_token)  # the old key removed


def test_a_revoked_or_forged_token_is_refused() -> None:
    token = issue_token([NEW], buyer_id=9)
    claims = read_claims([NEW], token)
    assert read_authorization([NEW], bearer(token)).buyer_id == 9
    with pytest.raises(Unauthorized, match="revoked"):
        read_authorization([NEW], bearer(token), revoked={claims.token_id})
    forged = token.replace(".b9.", ".b8.")
    with pytest.raises(Unauthorized):
        read_authorization([NEW], bearer(forged))
    other_cluster = TokenKey(id="k2", secret="another-cluster-secret")
    with pytest.raises(Unauthorized):
        read_authorization([other_cluster], bearer(token))


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ü",
        "Bearer ut2.k2.b1.99999999999.0123456789abcdef.é" + "A" * 42,
        "Bearer \x00\x01",
        "Bearer ut2.k2.admin.1.0123456789abcdef." + "A" * 43 + "\n",
        "bearer  ",
        "Bearer " + "ÿ" * 300,
    ],
)
def test_non_ascii_and_odd_tokens_are_unauthorized(header: str) -> None:
    with pytest.raises(Unauthorized):
        read_authorization([NEW], header)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_header_bytes_are_unauthorized_or_valid(raw: bytes) -> None:
    # Servers decode header bytes as latin-1: every byte string is some str.
    header = raw.decode("latin-1")
    try:
        read_authorization([NEW], header)
    except Unauthorized:
        return
    raise AssertionError(f"accepted {raw!r}")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(SIGNED_HEADERS), st.binary(max_size=80), max_size=5))
def test_any_signature_header_bytes_are_refused_not_raised(raw: dict[str, bytes]) -> None:
    verifier = Verifier("hz", lambda _sender: "region-secret-0123456789")
    headers = {name: value.decode("latin-1") for name, value in raw.items()}
    assert verifier.verify(headers, "POST", "/internal/x", b"{}") is None


def test_a_signature_is_for_one_destination_one_use_and_its_covered_headers() -> None:
    secret = "region-secret-0123456789"
    at_hz = Verifier("hz", lambda sender: secret if sender in ("sh", "bj") else None)
    plain = {"content-type": "application/json", "authorization": "Bearer x"}
    headers = {**plain, **sign(secret, "sh", "hz", "POST", "/internal/x", b"{}", plain)}
    assert at_hz.verify(headers, "POST", "/internal/x", b"{}") == "sh"
    assert at_hz.verify(headers, "POST", "/internal/x", b"{}") is None  # replayed
    assert at_hz.replays_refused == 1
    for_bj = {**plain, **sign(secret, "sh", "bj", "POST", "/internal/x", b"{}", plain)}
    assert at_hz.verify(for_bj, "POST", "/internal/x", b"{}") is None
    other_buyer = {**plain, **sign(secret, "sh", "hz", "POST", "/internal/x", b"{}", plain)}
    other_buyer["authorization"] = "Bearer y"
    assert at_hz.verify(other_buyer, "POST", "/internal/x", b"{}") is None
    other_body = {**plain, **sign(secret, "sh", "hz", "POST", "/internal/x", b"{}", plain)}
    assert at_hz.verify(other_body, "POST", "/internal/x", b"[]") is None


def test_the_nonce_memory_is_bounded() -> None:
    secret = "region-secret-0123456789"
    verifier = Verifier("hz", lambda _sender: secret, nonces_max=3)
    accepted = 0
    for _ in range(5):
        headers = sign(secret, "sh", "hz", "GET", "/x", b"")
        accepted += verifier.verify(headers, "GET", "/x", b"") == "sh"
    assert accepted == 3  # the rest refused (the sender retries with a new nonce)
    assert len(verifier._seen) == 3
    headers = sign(secret, "sh", "hz", "GET", "/x", b"")
    headers[NONCE_HEADER] = "n" * 65
    assert verifier.verify(headers, "GET", "/x", b"") is None


def test_three_separate_secrets_and_the_development_one() -> None:
    config = default_config()
    secrets = {config.region_secret, config.control_secret, config.token_keys[0].secret}
    assert len(secrets) == 3 and SECRET_DEFAULT not in secrets
    assert config.development_secrets() == ["tokens", "regions", "control"]
    assert check_production(config) is not None  # a warning, not a refusal
    with pytest.raises(DevelopmentSecret):
        check_production(config, production=True)
    own = config.model_copy(update={"secret": "a-secret-of-this-cluster-only"})
    assert own.development_secrets() == [] and check_production(own, production=True) is None
