"""Forwarding is once only and its headers are authenticated between regions."""

from __future__ import annotations

import time
import uuid

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
    forged = sign("not-the-cluster-secret", "sh", "POST", "/internal/center/reserve", body)
    response = api.http.post(
        api.url("hz", "/internal/center/reserve"),
        content=body,
        headers={"content-type": "application/json", **forged},
    )
    assert response.status_code == 401
    stale = sign(api.config.secret, "sh", "POST", "/internal/center/reserve", body)
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
    headers = {**api.buyer_headers(buyer), **sign(api.config.secret, "hz", "GET", target, b"")}
    response = api.http.get(api.url("sh", target), headers=headers)  # sh does not own bj's cell
    assert response.status_code == 421
    body = response.json()
    assert body["error"] == "wrong_region" and body["owner"] == "bj"
    assert "x-unitrade-forwarded-by" not in response.headers
    # The same signed request at the owner is served.
    served = api.http.get(api.url("bj", target), headers=headers)
    assert served.status_code == 200 and served.headers["x-unitrade-served-by"] == "bj"
