"""Forwarding is once only and its headers are authenticated between regions."""

from __future__ import annotations

import time
import uuid

import httpx
import orjson
import pytest

from tests.support import Api
from unitrade.rpc.signing import sign

pytestmark = pytest.mark.cluster


def test_client_set_forwarding_headers_have_no_effect(api: Api) -> None:
    sku = f"FWD-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=5)
    buyer = api.buyer_in("sh", 2001)
    forged = {
        "x-unitrade-from": "hz",
        "x-unitrade-ts": str(int(time.time())),
        "x-unitrade-sig": "0" * 64,
        "x-unitrade-served-by": "bj",
        "x-unitrade-region": "bj",
        "x-unitrade-forwarded-by": "bj",
    }
    body = {"items": [{"sku": sku, "qty": 1}]}
    response = api.call("hz", "POST", "/v1/orders", buyer, body, headers=forged)
    # Not treated as forwarded (it would have been refused as wrong_region): hz forwarded it.
    assert response.status_code == 201, response.text
    assert response.headers["x-unitrade-served-by"] == "sh"
    assert response.headers["x-unitrade-forwarded-by"] == "hz"
    assert response.headers["x-unitrade-region"] == "sh"


def test_the_internal_api_needs_a_region_signature(api: Api) -> None:
    body = orjson.dumps({"order_id": "1", "cell": 1, "lines": [["A", 1]]})
    unsigned = api.http.post(
        api.url("hz", "/internal/center/reserve"),
        content=body,
        headers={"content-type": "application/json"},
    )
    assert unsigned.status_code == 401 and unsigned.json()["error"] == "unauthorized"
    forged = sign("not-the-cluster-secret", "sh", "hz", "POST", "/internal/center/reserve", body)
    response = api.http.post(
        api.url("hz", "/internal/center/reserve"),
        content=body,
        headers={"content-type": "application/json", **forged},
    )
    assert response.status_code == 401
    stale = sign(api.config.region_secret, "sh", "hz", "POST", "/internal/center/reserve", body)
    stale["x-unitrade-ts"] = str(int(time.time()) - 3600)
    response = api.http.post(
        api.url("hz", "/internal/center/reserve"),
        content=body,
        headers={"content-type": "application/json", **stale},
    )
    assert response.status_code == 401


def test_a_forwarded_request_reaching_a_non_owner_is_refused_not_forwarded_again(
    api: Api,
) -> None:
    buyer = api.buyer_in("bj", 3001)
    target = "/v1/cart"
    token = api.buyer_headers(buyer)

    def signed_for(region: str) -> dict[str, str]:
        return {**token, **sign(api.config.region_secret, "hz", region, "GET", target, b"", token)}

    response = api.http.get(api.url("sh", target), headers=signed_for("sh"))  # not bj's owner
    assert response.status_code == 421
    body = response.json()
    assert body["error"] == "wrong_region" and body["owner"] == "bj"
    assert "x-unitrade-forwarded-by" not in response.headers
    # A request signed for the owner is served there.
    served = api.http.get(api.url("bj", target), headers=signed_for("bj"))
    assert served.status_code == 200 and served.headers["x-unitrade-served-by"] == "bj"


def test_a_signed_call_cannot_be_replayed_redirected_or_altered(api: Api) -> None:
    """The signature covers the destination and every header that changes meaning, and a
    nonce is accepted once: a captured call is worth nothing."""
    path = "/internal/center/levels"
    sku = f"SIG-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=3)
    body = orjson.dumps({"sku": sku})
    plain = {"content-type": "application/json"}

    def post(region: str, headers: dict[str, str]) -> httpx.Response:
        return api.http.post(api.url(region, path), content=body, headers=headers)

    captured = {**plain, **sign(api.config.region_secret, "sh", "hz", "POST", path, body, plain)}
    assert post("hz", captured).status_code == 200
    replayed = post("hz", captured)
    assert replayed.status_code == 401 and replayed.json()["error"] == "unauthorized"
    # Signed for sh, sent to hz (sh would not serve the center call, but it must not be
    # accepted as a signature at hz either).
    for_sh = {**plain, **sign(api.config.region_secret, "bj", "sh", "POST", path, body, plain)}
    assert post("hz", for_sh).status_code == 401
    # A covered header changed after signing.
    altered = {**plain, **sign(api.config.region_secret, "sh", "hz", "POST", path, body, plain)}
    altered["content-type"] = "text/plain"
    assert post("hz", altered).status_code == 401
    # The control plane's secret does not sign region-to-region calls, nor the other way.
    as_control = sign(api.config.region_secret, "control", "hz", "POST", path, body, plain)
    assert post("hz", {**plain, **as_control}).status_code == 401
    as_region = sign(api.config.control_secret, "sh", "hz", "POST", path, body, plain)
    assert post("hz", {**plain, **as_region}).status_code == 401


def test_a_forwarded_request_cannot_change_its_buyer(api: Api) -> None:
    """A signature made for one buyer's token does not carry another buyer's token: the
    receiver treats the request as an unsigned client request of that buyer."""
    alice, mallory = api.buyer_in("bj", 3101), api.buyer_in("bj", 3102)
    target = "/v1/cart"
    alice_token = api.buyer_headers(alice)
    signature = sign(api.config.region_secret, "hz", "sh", "GET", target, b"", alice_token)
    response = api.http.get(
        api.url("sh", target), headers={**api.buyer_headers(mallory), **signature}
    )
    # Not taken as forwarded (that would be a 421 at sh): sh forwards it as mallory's.
    assert response.status_code == 200, response.text
    assert response.json()["buyer_id"] == mallory
    assert response.headers["x-unitrade-forwarded-by"] == "sh"
