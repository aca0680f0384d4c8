"""Bad input gets a 4xx with `{error, message}`: never a 500, never a partial write."""

from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import Api
from unitrade.topology.config import TokenKey
from unitrade.web.tokens import issue_token

pytestmark = pytest.mark.cluster
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def sku(api: Api) -> str:
    name = f"BAD-{uuid.uuid4().hex[:8]}"
    api.put_product(name, stock=5)
    return name


def assert_error(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]


@pytest.mark.parametrize("region", ["hz", "sh", "bj"])  # bj: the buyer's own region
@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b"{not json", 400, "malformed_json"),
        (b'{"items": [{"sku": "A", "qty": 1}], "colour": "red"}', 422, "invalid_request"),
        (b'{"items": []}', 422, "invalid_request"),
        (b"{}", 422, "invalid_request"),
        (b'{"items": [{"sku": "A"}]}', 422, "invalid_request"),
        (b'{"items": [{"sku": "A", "qty": 0}]}', 422, "invalid_request"),
        (b'{"items": [{"sku": "A", "qty": -3}]}', 422, "invalid_request"),
        (b'{"items": [{"sku": "A", "qty": "2"}]}', 422, "invalid_request"),
        (b'{"items": [{"sku": "A", "qty": 1.5}]}', 422, "invalid_request"),
        (b'{"items": [{"sku": "bad sku!", "qty": 1}]}', 422, "invalid_request"),
        (b'{"items": [{"sku": "A", "qty": 100000}]}', 422, "invalid_request"),
        (b"[1, 2]", 422, "invalid_request"),
        (b"null", 422, "invalid_request"),
    ],
)
def test_malformed_orders_are_refused(
    api: Api, sku: str, region: str, raw: bytes, status: int, code: str
) -> None:
    buyer = api.buyer_in("bj", 501)
    before = api.levels(sku)
    response = api.http.post(
        api.url(region, "/v1/orders"), content=raw, headers={**api.buyer_headers(buyer), **JSON}
    )
    assert_error(response, status, code)
    assert api.levels(sku) == before
    assert api.call("bj", "GET", "/v1/orders", buyer).json()["orders"] == []


def test_unknown_sku_writes_nothing(api: Api, sku: str) -> None:
    buyer = api.buyer_in("sh", 601)
    before = api.levels(sku)
    response = api.order("hz", buyer, [(sku, 1), ("NO-SUCH-SKU", 1)])
    assert_error(response, 404, "unknown_sku")
    assert response.json()["sku"] == "NO-SUCH-SKU"
    assert api.levels(sku) == before
    assert api.call("sh", "GET", "/v1/orders", buyer).json()["orders"] == []
    assert_error(
        api.call("sh", "PUT", "/v1/cart/items/NO-SUCH-SKU", buyer, {"qty": 1}), 404, "unknown_sku"
    )
    # sh's copy of the catalog lacked it, so sh asked the owner of the global cell too.
    metrics = api.http.get(api.url("sh", "/metrics")).text
    (line,) = [x for x in metrics.splitlines() if x.startswith("unitrade_catalog_owner_reads")]
    assert float(line.split()[-1]) >= 2, line


def test_oversized_bodies_are_refused(api: Api) -> None:
    buyer = api.buyer_in("hz", 701)
    big = b'{"items": [' + b'{"sku": "A", "qty": 1},' * 5000 + b'{"sku": "A", "qty": 1}]}'
    for region in ("hz", "sh"):
        response = api.http.post(
            api.url(region, "/v1/orders"), content=big, headers={**api.buyer_headers(buyer), **JSON}
        )
        assert_error(response, 413, "payload_too_large")

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(100):
            yield b" " * 1024

    chunked = api.http.post(
        api.url("hz", "/v1/orders"), content=chunks(), headers={**api.buyer_headers(buyer), **JSON}
    )
    assert_error(chunked, 413, "payload_too_large")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Basic abc",
        "Bearer ut1.b5.forged",
        "Bearer ut1.admin.x",
        "Bearer " + "x" * 500,
    ],
)
def test_missing_or_bad_tokens_are_refused(api: Api, authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    for path in ("/v1/orders", "/v1/cart"):
        response = api.http.get(api.url("sh", path), headers=headers)
        assert_error(response, 401, "unauthorized")
    for method, path in (("PUT", "/v1/admin/products/X"), ("POST", "/v1/orders")):
        response = api.http.request(method, api.url("hz", path), headers=headers, json={})
        assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize("authorization", [None, "Bearer ut1.b5.forged"])
def test_catalog_reads_need_no_login(api: Api, sku: str, authorization: str | None) -> None:
    """Browsing is public in every shop: products and stock levels answer without a token
    (and with one that is not valid, as an anonymous reader); writes do not."""
    headers = {} if authorization is None else {"authorization": authorization}
    for region in ("hz", "sh", "bj"):
        listed = api.http.get(api.url(region, "/v1/products?limit=500"), headers=headers)
        assert listed.status_code == 200, listed.text
        product = api.http.get(api.url(region, f"/v1/products/{sku}"), headers=headers)
        assert product.status_code == 200 and product.json()["sku"] == sku
        levels = api.http.get(api.url(region, f"/v1/inventory/{sku}"), headers=headers)
        assert levels.status_code == 200 and levels.json()["sku"] == sku
        assert levels.headers["x-unitrade-region"] == "hz"  # the center cell's owner
    missing = api.http.get(api.url("sh", "/v1/products/NO-SUCH-SKU"), headers=headers)
    assert_error(missing, 404, "not_found")


def test_tokens_of_another_cluster_are_refused(api: Api) -> None:
    other = [TokenKey(id="k0", secret="some-other-cluster-secret")]
    token = issue_token(other, buyer_id=5)
    response = api.http.get(api.url("hz", "/v1/cart"), headers={"authorization": f"Bearer {token}"})
    assert_error(response, 401, "unauthorized")


def test_an_expired_token_is_refused(api: Api) -> None:
    token = issue_token(api.config.token_keys, buyer_id=5, ttl_s=60, now_s=time.time() - 120)
    response = api.http.get(api.url("sh", "/v1/cart"), headers={"authorization": f"Bearer {token}"})
    assert_error(response, 401, "unauthorized")
    assert "expired" in response.json()["message"]


@pytest.mark.parametrize(
    "raw",
    [
        b"Bearer \xc3\xbc",  # UTF-8 for a non-ASCII letter
        b"Bearer \xff\xfe\xfd",
        b"Bearer ut2.k0.b5.99999999999.0123456789abcdef.\xe9" + b"A" * 42,
        "Bearer ü".encode("latin-1"),
    ],
)
def test_non_ascii_tokens_are_unauthorized_not_errors(api: Api, raw: bytes) -> None:
    for region, path in (("hz", "/v1/cart"), ("sh", "/v1/orders"), ("bj", "/v1/products")):
        response = api.http.get(api.url(region, path), headers={"authorization": raw})
        expected = 200 if path == "/v1/products" else 401  # browsing needs no login
        assert response.status_code == expected, response.text


# Any bytes HTTP allows in a header value (visible ASCII, space, tab, and 0x80-0xff); the
# server refuses the others (control bytes) itself before any of our code runs.
HEADER_BYTES = st.binary(max_size=120).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip()
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(authorization=HEADER_BYTES, signature=HEADER_BYTES)
def test_arbitrary_credential_bytes_get_401(
    api: Api, authorization: bytes, signature: bytes
) -> None:
    headers = {
        "authorization": (b"Bearer " + authorization).strip(),
        "x-unitrade-from": b"hz",
        "x-unitrade-to": b"sh",
        "x-unitrade-sig": signature,
    }
    response = api.http.get(api.url("sh", "/v1/cart"), headers=headers)
    assert_error(response, 401, "unauthorized")
    internal = api.http.post(
        api.url("sh", "/internal/center/levels"), content=b'{"sku":"A"}', headers=headers
    )
    assert_error(internal, 401, "unauthorized")


def test_a_revoked_token_is_refused_in_every_region(api: Api) -> None:
    buyer = api.buyer_in("sh", 1201)
    token = issue_token(api.config.token_keys, buyer_id=buyer)
    headers = {"authorization": f"Bearer {token}"}
    assert api.http.get(api.url("bj", "/v1/cart"), headers=headers).status_code == 200
    refused = api.call("sh", "POST", "/v1/admin/tokens/revoke", buyer, {"token": token})
    assert_error(refused, 403, "forbidden")  # buyers do not revoke
    bad = api.call("sh", "POST", "/v1/admin/tokens/revoke", body={"token": "ut2.nope"})
    assert_error(bad, 404, "not_found")
    revoked = api.call("sh", "POST", "/v1/admin/tokens/revoke", body={"token": token})
    assert revoked.status_code == 200, revoked.text
    assert revoked.headers["x-unitrade-served-by"] == "hz"  # the global cell's owner
    deadline = time.monotonic() + 10
    for region in ("hz", "sh", "bj"):
        while True:
            response = api.http.get(api.url(region, "/v1/cart"), headers=headers)
            if response.status_code == 401 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert_error(response, 401, "unauthorized")
        assert "revoked" in response.json()["message"]
    # Another token of the same buyer still works.
    assert api.call("bj", "GET", "/v1/cart", buyer).status_code == 200


def test_the_admin_token_is_not_a_buyer_and_buyers_are_not_admins(api: Api, sku: str) -> None:
    assert_error(api.call("hz", "GET", "/v1/cart"), 403, "forbidden")
    buyer = api.buyer_in("hz", 801)
    body = {"title": "x", "price_cents": 1, "stock": 1}
    assert_error(api.call("sh", "PUT", f"/v1/admin/products/{sku}", buyer, body), 403, "forbidden")


@pytest.mark.parametrize(
    "body",
    [
        {"title": "", "price_cents": 1, "stock": 1},
        {"title": "x", "price_cents": -1, "stock": 1},
        {"title": "x", "price_cents": 1, "stock": -1},
        {"title": "x", "price_cents": 1},
        {"title": "x", "price_cents": 1, "stock": 1, "extra": True},
    ],
)
def test_bad_product_writes_are_refused(api: Api, sku: str, body: dict) -> None:  # type: ignore[type-arg]
    before = api.levels(sku)
    assert_error(
        api.call("bj", "PUT", f"/v1/admin/products/{sku}", body=body), 422, "invalid_request"
    )
    assert api.levels(sku) == before


@pytest.mark.parametrize("order_id", ["abc", "0", "-1", "99999999999999999999", "123"])
def test_unroutable_order_ids_are_not_found(api: Api, order_id: str) -> None:
    buyer = api.buyer_in("hz", 901)
    assert_error(api.call("sh", "GET", f"/v1/orders/{order_id}", buyer), 404, "not_found")


def test_bad_payments_and_queries(api: Api, sku: str) -> None:
    buyer = api.buyer_in("sh", 1001)
    oid = api.order("sh", buyer, [(sku, 1)]).json()["order_id"]
    for body in (
        {"payment_id": "", "amount_cents": 250},
        {"payment_id": "p"},
        {"payment_id": "p", "amount_cents": "250"},
        {"payment_id": "a b", "amount_cents": 1},
    ):
        assert_error(
            api.call("hz", "POST", f"/v1/orders/{oid}/pay", buyer, body), 422, "invalid_request"
        )
    for query in ("limit=0", "limit=1000", "limit=x", "cursor=abc"):
        assert_error(api.call("bj", "GET", f"/v1/orders?{query}", buyer), 422, "invalid_request")
    assert_error(api.call("hz", "POST", "/v1/cart/items/x", buyer), 405, "method_not_allowed")
    assert_error(api.call("hz", "GET", "/v1/nothing", buyer), 404, "not_found")
    assert api.call("sh", "GET", f"/v1/orders/{oid}", buyer).json()["status"] == "created"


# -- flash sales and coupons --------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"stock": 1, "tokens": 1, "per_buyer": 1}, 422, "invalid_request"),  # no window
        ({"stock": -1, "tokens": 1, "per_buyer": 1, "start_ms": 0, "end_ms": 1}, 422, None),
        ({"stock": 1, "tokens": 0, "per_buyer": 1, "start_ms": 0, "end_ms": 1}, 422, None),
        ({"stock": 1, "tokens": 5, "per_buyer": 101, "start_ms": 0, "end_ms": 1}, 422, None),
        ({"stock": 1, "tokens": 5, "per_buyer": "1", "start_ms": 0, "end_ms": 1}, 422, None),
        ({"stock": 1, "tokens": 5, "per_buyer": 1, "start_ms": 0, "end_ms": 1}, 409, "window"),
        ({"stock": 1, "tokens": 5, "per_buyer": 1, "start_ms": 9, "end_ms": 5}, 409, "window"),
    ],
)
def test_bad_sale_definitions_are_refused(
    api: Api, sku: str, body: dict[str, object], status: int, code: str | None
) -> None:
    response = api.call("sh", "POST", "/v1/admin/sales", body={"sku": sku, **body})
    expected = {None: "invalid_request", "window": "sale_window_invalid"}.get(code, code)
    assert_error(response, status, str(expected))
    listed = api.call("sh", "GET", "/v1/admin/sales").json()["sales"]
    assert sku not in {s["sku"] for s in listed}


def test_sale_refusals_are_typed(api: Api, sku: str) -> None:
    buyer = api.buyer_in("sh", 901)
    unknown = api.call("bj", "POST", "/v1/sales/0123456789ab/tokens", buyer)
    assert_error(unknown, 404, "sale_not_found")
    assert_error(api.call("bj", "GET", "/v1/sales/0123456789ab"), 404, "sale_not_found")
    assert_error(
        api.call("bj", "POST", "/v1/sales/NOT-AN-ID/tokens", buyer), 422, "invalid_request"
    )
    start = int(time.time() * 1000)
    window = {"start_ms": start + 3_600_000, "end_ms": start + 7_200_000}
    later = f"SALE-{uuid.uuid4().hex[:8]}"
    api.put_product(later, stock=0)
    created = api.call(
        "bj",
        "POST",
        "/v1/admin/sales",
        body={"sku": later, "stock": 3, "tokens": 9, "per_buyer": 1, **window},
    )
    assert created.status_code == 201, created.text
    sale_id = created.json()["sale_id"]
    assert_error(api.call("sh", "POST", f"/v1/sales/{sale_id}/tokens", buyer), 409, "sale_closed")
    no_token = api.order("hz", buyer, [(later, 1)])
    assert_error(no_token, 403, "sale_token_required")
    assert no_token.json()["sale_id"] == sale_id
    forged = api.order("hz", buyer, [(later, 1)], sale_token="0" * 16)
    assert_error(forged, 409, "sale_closed")  # the window first: the sale has not started
    assert_error(api.order("hz", buyer, [(sku, 1)], sale_token="0" * 16), 422, "invalid_request")
    assert_error(api.order("hz", buyer, [(sku, 1)], sale_token="short"), 422, "invalid_request")
    again = api.call(
        "sh",
        "POST",
        "/v1/admin/sales",
        body={"sku": later, "stock": 3, "tokens": 9, "per_buyer": 1, **window},
    )
    assert_error(again, 409, "conflict")
    assert again.json()["sale_id"] == sale_id
    assert api.levels(later) == {"sku": later, "available": 3, "reserved": 0, "sold": 0}
    valid = {"sku": sku, "stock": 3, "tokens": 9, "per_buyer": 1, **window}
    assert_error(api.call("sh", "POST", "/v1/admin/sales", buyer, valid), 403, "forbidden")


def test_coupon_refusals_are_typed(api: Api, sku: str) -> None:
    buyer = api.buyer_in("bj", 951)
    assert_error(api.call("sh", "POST", "/v1/coupons/NOPE/claim", buyer), 404, "coupon_not_found")
    assert_error(
        api.call("sh", "POST", "/v1/coupons/bad%20code/claim", buyer), 422, "invalid_request"
    )
    for discount in ("0", "101%", "5.5", "-1", "ten"):
        bad = api.call(
            "hz", "POST", "/v1/admin/coupons", body={"code": "X1", "count": 1, "discount": discount}
        )
        assert_error(bad, 422, "invalid_request")
    code = f"C{uuid.uuid4().hex[:8]}"
    made = api.call(
        "bj",
        "POST",
        "/v1/admin/coupons",
        body={"code": code, "count": 1, "discount": "50%", "min_total_cents": 10_000},
    )
    assert made.status_code == 201, made.text
    before = api.levels(sku)
    not_claimed = api.order("sh", buyer, [(sku, 1)], coupon=code)
    assert_error(not_claimed, 409, "coupon_not_claimed")
    assert api.call("hz", "POST", f"/v1/coupons/{code}/claim", buyer).status_code == 200
    below = api.order("sh", buyer, [(sku, 1)], coupon=code)
    assert_error(below, 409, "coupon_not_applicable")
    assert below.json()["min_total_cents"] == 10_000
    other = api.buyer_in("sh", 961)
    assert_error(api.call("bj", "POST", f"/v1/coupons/{code}/claim", other), 409, "coupon_sold_out")
    assert api.levels(sku) == before
    assert api.call("bj", "GET", "/v1/orders", buyer).json()["orders"] == []
