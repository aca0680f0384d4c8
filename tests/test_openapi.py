"""The OpenAPI document describes every answer: schemathesis, an external client, drives
every operation of a real three-region cluster from its `/openapi.json`, with a buyer token
and the admin token, valid and invalid data, and all its checks on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import load_all_checks

from tests.support import Api, write_topology
from unitrade.cluster import LocalCluster

pytestmark = pytest.mark.cluster

EXAMPLES_MAX = 25  # per operation and token: the whole file stays well under two minutes
SEED_SKU = "OPENAPI-TEA"


@pytest.fixture(scope="module")
def own_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A cluster of its own: schemathesis writes products and orders at random."""
    directory: Path = tmp_path_factory.mktemp("openapi")
    config, path = write_topology(directory)
    with LocalCluster(config, directory / "data", path) as running:
        running.start()
        client = Api(running.config)
        try:
            yield client
        finally:
            client.http.close()


def all_checks() -> list[Any]:
    load_all_checks()
    names = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "positive_data_acceptance",
        "missing_required_header",
        "unsupported_method",
        "allow_header_conformance",
        "ignored_auth",
        "use_after_free",
        "ensure_resource_availability",
    ]
    return [getattr(schemathesis.checks, name) for name in names]


def seed(api: Api, buyer: int) -> None:
    """Something for the reads to return: a product with stock and an order of the buyer."""
    api.put_product(SEED_SKU, stock=1_000_000, price_cents=120)
    created = api.order(api.home(buyer), buyer, [(SEED_SKU, 1)])
    assert created.status_code == 201, created.text


def fuzz(api: Api, region: str, headers: dict[str, str]) -> list[str]:
    """Every operation of `region`'s document, positive and negative data: the failures."""
    base_url = api.url(region, "")
    # The token goes in as the document's bearer scheme, so that ignored_auth knows it is
    # the real one and probes each operation without it and with a forged one.
    scheme, _, token = headers["authorization"].partition(" ")
    assert scheme.lower() == "bearer"
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"bearer": {"bearer": token}}}})
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", config=config)
    checks = all_checks()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @settings(
            max_examples=EXAMPLES_MAX,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=cases)
        def run(case: Any) -> None:
            case.call_and_validate(base_url=base_url, checks=checks)

        try:
            run()
        except (Exception, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup
            failures.append(f"{operation.label}: {exc}")
    return failures


@pytest.mark.parametrize("token", ["buyer", "admin"])
def test_every_answer_conforms_to_the_document(own_api: Api, token: str) -> None:
    buyer = own_api.buyer_in("sh", 4242)
    seed(own_api, buyer)
    headers = own_api.admin_headers if token == "admin" else own_api.buyer_headers(buyer)
    # bj is not the buyer's home: buyer requests are forwarded, answers come from sh.
    failures = fuzz(own_api, "bj", headers)
    assert not failures, "\n\n".join(failures)


# -- the answers the document promises, checked one by one --------------------------------


def test_the_document_names_every_status_and_the_bearer_scheme(own_api: Api) -> None:
    spec = httpx.get(own_api.url("hz", "/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    assert set(schemas["Error"]["required"]) == {"error", "message"}
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, answer in operation["responses"].items():
                body = answer["content"]["application/json"]["schema"]
                assert body != {}, f"{method} {path} {status}"
                if status.startswith(("4", "5")):
                    assert body == {"$ref": "#/components/schemas/Error"}
            public = path.startswith(("/v1/products", "/v1/inventory")) or path in (
                "/healthz",
                "/v1/sales/{sale_id}",
            )
            assert ("security" in operation) == (not public), f"{method} {path}"
            if not public:
                assert "401" in operation["responses"]
            if "503" in operation["responses"]:
                assert "Retry-After" in operation["responses"]["503"]["headers"]


BODY_ROUTES = [
    ("POST", "/v1/orders"),
    ("POST", "/v1/orders/{order}/pay"),
    ("PUT", "/v1/cart/items/" + SEED_SKU),
    ("POST", "/v1/cart/checkout"),
    ("PUT", "/v1/admin/products/" + SEED_SKU),
    ("POST", "/v1/admin/sales"),
    ("POST", "/v1/admin/coupons"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize("region", ["bj", "sh"])  # forwarded to the buyer's home, and at it
def test_invalid_utf8_is_malformed_json_on_every_body_route(
    own_api: Api, method: str, path: str, region: str
) -> None:
    buyer = own_api.buyer_in("sh", 5151)
    own_api.put_product(SEED_SKU, stock=1_000_000, price_cents=120)
    order = own_api.order("sh", buyer, [(SEED_SKU, 1)]).json()["order_id"]
    headers = own_api.admin_headers if "/admin/" in path else own_api.buyer_headers(buyer)
    response = own_api.http.request(
        method,
        own_api.url(region, path.format(order=order)),
        content=b"\xff\xfe",
        headers={**headers, "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "malformed_json"


def test_405_carries_allow_and_is_answered_where_it_arrives(own_api: Api) -> None:
    buyer = own_api.buyer_in("sh", 6161)
    headers = own_api.buyer_headers(buyer)
    for path, allowed in (
        ("/v1/orders", {"GET", "POST"}),
        ("/v1/cart/items/" + SEED_SKU, {"PUT", "DELETE"}),
        ("/v1/cart", {"GET"}),
    ):
        response = own_api.http.request("PATCH", own_api.url("bj", path), headers=headers)
        assert response.status_code == 405, response.text
        assert response.json()["error"] == "method_not_allowed"
        assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
        assert response.headers["x-unitrade-served-by"] == "bj"
        assert "x-unitrade-forwarded-by" not in response.headers
    unknown = own_api.http.get(own_api.url("bj", "/v1/carts"), headers=headers)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    assert unknown.headers["x-unitrade-served-by"] == "bj"
    assert "x-unitrade-forwarded-by" not in unknown.headers


def test_the_control_planes_document_names_its_errors_and_scheme(tmp_path: Path) -> None:
    """The operator API documents its errors in the same `Error` shape as the regions'
    (not FastAPI's validation error) and the bearer scheme on every admin route."""
    from unitrade.control.app import build_control_app
    from unitrade.control.plane import ControlPlane
    from unitrade.control.store import SqlControlStore
    from unitrade.topology.config import default_config

    config = default_config()
    store = SqlControlStore(f"sqlite:///{tmp_path}/control.db")
    document = build_control_app(config, ControlPlane(config, store)).openapi()
    assert "HTTPValidationError" not in str(document)
    assert "bearer" in document["components"]["securitySchemes"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path == "/healthz":
                assert "security" not in operation
                continue
            assert operation["security"] == [{"bearer": []}], (method, path)
            for status in ("401", "403", "422"):
                schema = operation["responses"][status]["content"]["application/json"]["schema"]
                assert schema["$ref"].endswith("/Error"), (method, path, status)
