"""Flow control on a live three-region cluster, over real sockets: what a client sees of
every limit (429, Retry-After, the limit named, before any forwarding), of queueing and
warm-up, of overload shedding, of the breakers, and of every degradation switch; and
that each change is a rule version pushed and acknowledged by every region."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.support import Api, free_ports, topology_toml
from unitrade.cli import main
from unitrade.cluster import LocalCluster
from unitrade.topology.config import load_config

pytestmark = pytest.mark.cluster

FLOW = """
[flow]
client_ip_header = "x-forwarded-for"
trusted_proxies = ["127.0.0.0/8"]
switches = []
[flow.limits.admin_writes]
rate_per_s = 500
[flow.breakers]
calls_min = 3
open_ms = 1000
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    directory: Path = tmp_path_factory.mktemp("flow")
    path = directory / "topology.toml"
    path.write_text(topology_toml(free_ports(4)) + FLOW)
    with LocalCluster(load_config(path), directory / "data", path) as running:
        running.start()
        yield running


@pytest.fixture(scope="module")
def api(cluster: LocalCluster) -> Iterator[Api]:
    with Api(cluster.config) as client:
        yield client


class Control:
    """The control plane's flow API; puts every change back after the test."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.first = self.get()

    def url(self, path: str) -> str:
        return self.api.config.control.base_url + path

    def get(self) -> dict[str, Any]:
        answer = self.api.http.get(self.url("/v1/flow"), headers=self.api.admin_headers)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    def put(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = self.api.http.put(self.url(path), json=body, headers=self.api.admin_headers)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        # Pushed and acknowledged by every region before the answer.
        assert result["acknowledged"] == sorted(self.api.config.region_names), result
        return result

    def limit(self, name: str, **fields: Any) -> dict[str, Any]:
        return self.put(f"/v1/flow/limits/{name}", fields)

    def switch(self, name: str, on: bool) -> dict[str, Any]:
        return self.put(f"/v1/flow/switches/{name}", {"on": on})

    def restore(self) -> None:
        now = self.get()["flow"]
        first = self.first["flow"]
        for name, limit in first["limits"].items():
            if now["limits"][name] != limit:
                self.limit(name, **{k: v for k, v in limit.items() if v is not None})
        for name in set(now["switches"]) - set(first["switches"]):
            self.switch(name, False)
        for section in ("overload", "breakers"):
            if now[section] != first[section]:
                self.put(f"/v1/flow/{section}", first[section])


@pytest.fixture
def control(api: Api) -> Iterator[Control]:
    flow = Control(api)
    try:
        yield flow
    finally:
        flow.restore()


def from_ip(ip: str) -> dict[str, str]:
    return {"x-forwarded-for": ip}


def fresh_ip() -> str:
    return f"198.51.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250 + 1}"


def health(api: Api, region: str) -> dict[str, Any]:
    body: dict[str, Any] = api.http.get(api.url(region, "/healthz")).json()
    return body


def metric(api: Api, region: str, name: str, **labels: str) -> float:
    text = api.http.get(api.url(region, "/metrics")).text
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = line[len(name) + 1 : line.index("}")]
            if all(part in got.split(",") for part in wanted.split(",") if part):
                total += float(line.rsplit(" ", 1)[1])
    return total


def assert_limited(response: httpx.Response, limit: str) -> None:
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["error"] == "rate_limited" and body["limit"] == limit, body
    assert int(response.headers["retry-after"]) >= 1


# -- the rules: topology, live changes, acknowledgements, status ------------------------------


def test_flow_rules_start_from_the_topology_and_change_live_as_rule_versions(
    api: Api, control: Control, cluster: LocalCluster
) -> None:
    start = control.get()
    assert start["flow"]["limits"]["admin_writes"]["rate_per_s"] == 500  # from [flow]
    assert start["flow"]["breakers"]["calls_min"] == 3
    changed = control.limit("buyer", rate_per_s=7)
    version = changed["rule_version"]
    assert version == start["rule_version"] + 1
    assert changed["flow"]["version"] == version
    assert changed["flow"]["limits"]["buyer"]["rate_per_s"] == 7
    assert changed["flow"]["limits"]["buyer"]["burst"] is None  # one second's worth now
    for region in api.config.region_names:  # in force in every region, acknowledged
        seen = health(api, region)
        assert seen["rule_version"] >= version and seen["flow"]["version"] == version
        assert min(seen["acked"].values()) >= version
    history = api.http.get(
        control.url("/v1/rules"), params={"limit": 1}, headers=api.admin_headers
    ).json()["rules"][0]
    assert history["version"] == version and history["reason"] == "limit buyer: rate_per_s=7.0"
    # Nothing changed: nothing published.
    again = control.limit("buyer", rate_per_s=7)
    assert again["rule_version"] == version
    # Bad values are refused with the field named, and nothing is published.
    bad = api.http.put(
        control.url("/v1/flow/limits/ip"), json={"concurrency_max": 3}, headers=api.admin_headers
    )
    assert bad.status_code == 422 and "concurrency_max" in bad.json()["message"]
    unknown = api.http.put(
        control.url("/v1/flow/limits/nope"), json={"rate_per_s": 3}, headers=api.admin_headers
    )
    assert unknown.status_code == 404
    assert control.get()["rule_version"] == version
    # The CLI lists and changes them; `unitrade status` shows the limits version.
    env = {"UNITRADE_CONFIG": str(cluster.config_path)}
    runner = CliRunner()
    listed = runner.invoke(main, ["limits"], env=env)
    assert listed.exit_code == 0, listed.output
    assert "order_sku" in listed.output and "breakers: on" in listed.output
    result = runner.invoke(
        main, ["limits", "set", "buyer", "--rate", "9", "--burst", "20"], env=env
    )
    assert result.exit_code == 0, result.output
    assert f"flow rules at rule version {version + 1}; acknowledged by bj, hz, sh" in result.output
    status = runner.invoke(main, ["status"], env=env)
    assert f"v{version + 1} (memory)" in status.output, status.output


# -- edge limits: before any forwarding ------------------------------------------------------


def test_the_ip_limit_refuses_at_the_gateway_called_before_forwarding(
    api: Api, control: Control
) -> None:
    control.limit("ip", rate_per_s=0.1, burst=3)
    buyer = api.buyer_in("hz", 40_001)  # its requests to sh are forwarded to hz
    ip = fresh_ip()
    forwarded_before = health(api, "sh")["forwarded"]
    answers = [api.call("sh", "GET", "/v1/cart", buyer, headers=from_ip(ip)) for _ in range(4)]
    assert [a.status_code for a in answers[:3]] == [200, 200, 200]
    refused = answers[3]
    assert_limited(refused, "ip")
    assert ip in refused.json()["message"]
    assert refused.headers["x-unitrade-served-by"] == "sh"
    assert "x-unitrade-forwarded-by" not in refused.headers
    assert health(api, "sh")["forwarded"] == forwarded_before + 3  # the refused one was not
    # Another client's address is not affected.
    other = api.call("sh", "GET", "/v1/cart", buyer, headers=from_ip(fresh_ip()))
    assert other.status_code == 200, other.text
    assert metric(api, "sh", "unitrade_flow_refused_total", limit="ip") >= 1
    assert metric(api, "sh", "unitrade_flow_admitted_total", limit="ip") >= 4
    # Health probes and metrics are never limited.
    for _ in range(5):
        assert api.http.get(api.url("sh", "/healthz"), headers=from_ip(ip)).status_code == 200


def test_the_buyer_limit_refuses_one_buyer_only(api: Api, control: Control) -> None:
    control.limit("buyer", rate_per_s=0.1, burst=2)
    buyer, other = api.buyer_in("sh", 41_001), api.buyer_in("sh", 42_001)
    codes = [api.call("bj", "GET", "/v1/cart", buyer).status_code for _ in range(2)]
    assert codes == [200, 200]
    assert_limited(api.call("bj", "GET", "/v1/cart", buyer), "buyer")
    assert api.call("bj", "GET", "/v1/cart", other).status_code == 200
    assert metric(api, "bj", "unitrade_flow_refused_total", limit="buyer") >= 1


def test_the_region_limit_and_its_warm_up_mode(api: Api, control: Control) -> None:
    # Reject with a burst of 20: 20 of 30 requests sent at once pass.
    control.limit("region", rate_per_s=1, burst=20)
    ok = burst_of(api, "bj", 30)
    assert 20 <= ok <= 22, ok  # the burst, and what refilled while the 30 came in
    # Warm-up at 20/s from cold: a cold region lets far fewer of a burst through than its
    # rate, and more as it warms up (counts, not time).
    control.limit("region", rate_per_s=20, mode="warm_up", warm_up_s=30, cold_factor=10)
    cold = burst_of(api, "bj", 30)
    assert 1 <= cold <= 6, cold
    assert metric(api, "bj", "unitrade_flow_refused_total", limit="region") >= 10


def burst_of(api: Api, region: str, n: int) -> int:
    """`n` requests at once from as many client addresses; how many were admitted."""

    def one(_: int) -> int:
        answer = api.call(region, "GET", "/v1/products?limit=1", headers=from_ip(fresh_ip()))
        if answer.status_code == 429:
            assert_limited(answer, "region")
        return answer.status_code

    with ThreadPoolExecutor(n) as pool:
        codes = list(pool.map(one, range(n)))
    assert set(codes) <= {200, 429}, codes
    return codes.count(200)


# -- business limits: where the request is served --------------------------------------------


def test_order_submissions_per_buyer_are_limited_where_served_and_replays_never(
    api: Api, control: Control
) -> None:
    sku = f"FL-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=100)
    control.limit("order_buyer", rate_per_s=0.1, burst=2)
    buyer = api.buyer_in("hz", 43_001)
    first = api.order("sh", buyer, [(sku, 1)], idempotency_key="k-1")
    second = api.order("sh", buyer, [(sku, 1)])
    assert (first.status_code, second.status_code) == (201, 201), second.text
    refused = api.order("sh", buyer, [(sku, 1)])
    assert_limited(refused, "order_buyer")
    assert refused.headers["x-unitrade-served-by"] == "hz"  # limited at the owner
    assert refused.headers["x-unitrade-forwarded-by"] == "sh"
    replay = api.order("sh", buyer, [(sku, 1)], idempotency_key="k-1")
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["order_id"] == first.json()["order_id"]
    assert api.levels(sku)["reserved"] == 2  # the refused order reserved nothing


def test_a_hot_sku_is_limited_on_its_own(api: Api, control: Control) -> None:
    hot, cold = f"HOT-{uuid.uuid4().hex[:6]}", f"COLD-{uuid.uuid4().hex[:6]}"
    api.put_product(hot, stock=100)
    api.put_product(cold, stock=100)
    control.limit("order_sku", overrides={hot: 0.1})
    buyers = [api.buyer_in("hz", 44_001 + 1000 * i) for i in range(4)]
    assert api.order("hz", buyers[0], [(hot, 1)]).status_code == 201
    assert_limited(api.order("hz", buyers[1], [(hot, 1)]), "order_sku")
    assert "SKU " + hot in api.order("hz", buyers[2], [(hot, 1), (cold, 1)]).json()["message"]
    for buyer in buyers:  # the other SKU is not slowed
        assert api.order("hz", buyer, [(cold, 1)]).status_code == 201
    assert api.levels(hot)["reserved"] == 1


def test_queueing_lets_a_burst_of_orders_through_in_turn(api: Api, control: Control) -> None:
    sku = f"Q-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=100)
    buyer = api.buyer_in("hz", 45_001)
    control.limit("order_buyer", rate_per_s=10, burst=1, mode="queue", queue_ms_max=5000)
    queued_before = metric(api, "hz", "unitrade_flow_queued_total", limit="order_buyer")

    def order(_: int) -> int:
        return api.order("hz", buyer, [(sku, 1)]).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(order, range(6)))
    assert codes == [201] * 6  # a burst over the rate: queued, not refused
    queued = metric(api, "hz", "unitrade_flow_queued_total", limit="order_buyer")
    assert queued - queued_before >= 3
    # With a short queue a burst is partly refused.
    control.limit("order_buyer", queue_ms_max=150)
    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(order, range(12)))
    assert set(codes) == {201, 429}, codes


def test_admin_writes_are_limited(api: Api, control: Control) -> None:
    control.limit("admin_writes", rate_per_s=0.1, burst=1)
    sku = f"AW-{uuid.uuid4().hex[:8]}"
    body = {"title": "t", "price_cents": 100, "stock": 5}
    assert api.call("sh", "PUT", f"/v1/admin/products/{sku}", body=body).status_code == 200
    refused = api.call("sh", "PUT", f"/v1/admin/products/{sku}", body=body)
    assert_limited(refused, "admin_writes")
    assert refused.headers["x-unitrade-served-by"] == "hz"  # the global cell's owner


# -- degradation switches ----------------------------------------------------------------------


def test_switch_order_list_owner_reads_serves_order_lists_from_the_replica(
    api: Api, control: Control, cluster: LocalCluster
) -> None:
    sku = f"OL-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=10)
    buyer = api.buyer_in("hz", 46_001)
    assert api.order("hz", buyer, [(sku, 1)]).status_code == 201
    before = api.call("sh", "GET", "/v1/orders", buyer)
    assert before.headers["x-unitrade-served-by"] == "hz"  # forwarded to the owner
    env = {"UNITRADE_CONFIG": str(cluster.config_path)}
    runner = CliRunner()
    result = runner.invoke(main, ["degrade", "order_list_owner_reads", "on"], env=env)
    assert result.exit_code == 0, result.output
    listed = runner.invoke(main, ["degrade"], env=env)
    assert "order_list_owner_reads" in listed.output and "on" in listed.output
    deadline = time.monotonic() + 10
    while True:  # the replica catches up; the list is served by sh itself
        after = api.call("sh", "GET", "/v1/orders", buyer)
        assert after.status_code == 200
        assert after.headers["x-unitrade-served-by"] == "sh"
        assert "x-unitrade-forwarded-by" not in after.headers
        if after.json()["orders"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert metric(api, "sh", "unitrade_flow_switch", switch="order_list_owner_reads") == 1
    result = runner.invoke(main, ["degrade", "order_list_owner_reads", "off"], env=env)
    assert result.exit_code == 0, result.output
    assert api.call("sh", "GET", "/v1/orders", buyer).headers["x-unitrade-served-by"] == "hz"


def test_switch_cart_writes_refuses_cart_lines_but_checkout_works(
    api: Api, control: Control
) -> None:
    sku = f"CW-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=10)
    buyer = api.buyer_in("bj", 47_001)
    assert api.call("bj", "PUT", f"/v1/cart/items/{sku}", buyer, {"qty": 2}).status_code == 200
    control.switch("cart_writes", True)
    refused = api.call("hz", "PUT", f"/v1/cart/items/{sku}", buyer, {"qty": 3})
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert body["error"] == "degraded" and body["switch"] == "cart_writes"
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["x-unitrade-served-by"] == "hz"  # refused before the hop
    deleted = api.call("bj", "DELETE", f"/v1/cart/items/{sku}", buyer)
    assert deleted.status_code == 503 and deleted.json()["switch"] == "cart_writes"
    cart = api.call("bj", "GET", "/v1/cart", buyer).json()
    assert [(i["sku"], i["qty"]) for i in cart["items"]] == [(sku, 2)]
    checkout = api.call("sh", "POST", "/v1/cart/checkout", buyer, {})
    assert checkout.status_code == 201, checkout.text
    control.switch("cart_writes", False)
    assert api.call("bj", "PUT", f"/v1/cart/items/{sku}", buyer, {"qty": 1}).status_code == 200


def test_switch_admin_writes_refuses_product_writes_not_revocations(
    api: Api, control: Control
) -> None:
    sku = f"AD-{uuid.uuid4().hex[:8]}"
    control.switch("admin_writes", True)
    body = {"title": "t", "price_cents": 100, "stock": 5}
    refused = api.call("bj", "PUT", f"/v1/admin/products/{sku}", body=body)
    assert refused.status_code == 503 and refused.json()["switch"] == "admin_writes"
    assert api.call("hz", "GET", f"/v1/products/{sku}").status_code == 404  # not written
    from unitrade.web.tokens import issue_token

    token = issue_token(api.config.token_keys, buyer_id=48_001)
    revoked = api.call("bj", "POST", "/v1/admin/tokens/revoke", body={"token": token})
    assert revoked.status_code == 200, revoked.text
    control.switch("admin_writes", False)
    assert api.call("bj", "PUT", f"/v1/admin/products/{sku}", body=body).status_code == 200


def test_switch_catalog_owner_reads_leaves_a_sku_unknown_until_replicated(
    api: Api, control: Control, cluster: LocalCluster
) -> None:
    """A SKU sh's replica of the catalog lacks (hz, the global owner, refuses replication
    pulls meanwhile): ordered at sh it is asked of hz, unless the switch is on."""
    cluster.stop_region("hz")
    cluster.start_region("hz", env={"UNITRADE_FAULTS": "refuse_pulls"})
    cluster.wait_healthy(["hz"])
    try:
        new, other = f"CO-{uuid.uuid4().hex[:8]}", f"CO-{uuid.uuid4().hex[:8]}"
        body = {"title": "t", "price_cents": 100, "stock": 5}
        for sku in (new, other):
            answer = api.call("hz", "PUT", f"/v1/admin/products/{sku}", body=body)
            assert answer.status_code == 200, answer.text
        buyer = api.buyer_in("sh", 49_001)
        control.switch("catalog_owner_reads", True)
        reads = metric(api, "sh", "unitrade_catalog_owner_reads_total")
        refused = api.order("sh", buyer, [(new, 1)])
        assert refused.status_code == 404 and refused.json()["error"] == "unknown_sku"
        assert metric(api, "sh", "unitrade_catalog_owner_reads_total") == reads  # not asked
        control.switch("catalog_owner_reads", False)
        ordered = api.order("sh", buyer, [(other, 1)])
        assert ordered.status_code == 201, ordered.text  # read from the owner
        assert metric(api, "sh", "unitrade_catalog_owner_reads_total") == reads + 1
    finally:
        cluster.stop_region("hz")
        cluster.start_region("hz")
        cluster.wait_healthy(["hz"])


# -- overload and breakers ---------------------------------------------------------------------


def test_overload_sheds_new_requests_but_never_health_or_replication(
    api: Api, control: Control, cluster: LocalCluster
) -> None:
    """hz (the center) is frozen, so orders at sh wait on their stock reservation and stay
    in flight; past in_flight_max sh sheds new requests with 503 overloaded at once, while
    its /healthz answers."""
    import os
    import signal

    sku = f"OV-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=100)
    buyer = api.buyer_in("sh", 50_001)
    control.put("/v1/flow/overload", {"in_flight_max": 2})
    control.put("/v1/flow/breakers", {"enabled": False})
    hz = cluster.processes["hz"]
    os.kill(hz.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as pool:
            stuck = [
                pool.submit(api.order, "sh", api.buyer_in("sh", 50_101 + 100 * i), [(sku, 1)])
                for i in range(2)
            ]
            deadline = time.monotonic() + 10
            while health(api, "sh")["flow"]["overload"]["in_flight"] < 2:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            shed = api.order("sh", buyer, [(sku, 1)])
            assert shed.status_code == 503, shed.text
            assert shed.json()["error"] == "overloaded"
            assert shed.headers["retry-after"] == "1"
            assert api.http.get(api.url("sh", "/healthz")).status_code == 200
            assert api.http.get(api.url("sh", "/metrics")).status_code == 200
            # Replication is never shed: bj keeps pulling sh's cells meanwhile.
            time.sleep(2.5)  # longer than a long poll: bj has pulled again since
            streams = [s for s in health(api, "bj")["replication"] if s["source"] == "sh"]
            assert streams and all(s["heard_ms_ago"] < 2500 for s in streams), streams
            assert metric(api, "sh", "unitrade_flow_shed_total", reason="in_flight_max") >= 1
            os.kill(hz.pid, signal.SIGCONT)
            assert all(f.result().status_code in (201, 503) for f in stuck)
    finally:
        os.kill(hz.pid, signal.SIGCONT)
    # sh's replication from hz was never shed: it still follows hz.
    assert api.order("sh", buyer, [(sku, 1)]).status_code == 201


def test_the_center_breaker_opens_fails_fast_and_closes_after_a_probe(
    api: Api, control: Control, cluster: LocalCluster
) -> None:
    sku = f"BR-{uuid.uuid4().hex[:8]}"
    api.put_product(sku, stock=100)
    buyers = [api.buyer_in("sh", 51_001 + 100 * i) for i in range(8)]
    control.put("/v1/flow/breakers", {"calls_min": 3, "open_ms": 1000, "error_ratio_max": 0.5})
    cluster.stop_region("hz")
    try:
        codes = []
        for buyer in buyers:
            answer = api.order("sh", buyer, [(sku, 1)])
            codes.append(answer.json()["error"])
        # Refused, not unknown: no connection could be made, so nothing reached hz. The
        # breaker counts every center call of sh's, its background ones too (reconciling
        # orders an earlier test's fault left open), so it may open before a third order:
        # refused until it opens (at most calls_min orders), failing fast from then on.
        assert set(codes) <= {"region_unavailable", "circuit_open"}, codes
        assert "circuit_open" in codes, codes
        opened = codes.index("circuit_open")
        assert opened <= 3 and codes[:opened] == ["region_unavailable"] * opened, codes
        fast = api.order("sh", buyers[0], [(sku, 1)])
        body = fast.json()
        assert fast.status_code == 503 and body["error"] == "circuit_open", body
        assert body["region"] == "hz" and body["call"] == "center"
        assert "nothing was sent" in body["message"]
        breakers = health(api, "sh")["flow"]["breakers"]
        assert {"region": "hz", "call": "center", "state": "open"}.items() <= next(
            b for b in breakers if b["call"] == "center"
        ).items()
        assert metric(api, "sh", "unitrade_flow_breaker_state", target="hz", call="center") == 1
        status = CliRunner().invoke(
            main, ["status"], env={"UNITRADE_CONFIG": str(cluster.config_path)}
        )
        assert "center@hz" in status.output and "open" in status.output, status.output
    finally:
        cluster.start_region("hz")
        cluster.wait_healthy(["hz"])
    # After open_ms a probe goes through; a good one closes the breaker.
    deadline = time.monotonic() + 15
    while True:
        answer = api.order("sh", buyers[1], [(sku, 1)])
        if answer.status_code == 201:
            break
        assert answer.json()["error"] in ("circuit_open", "region_unavailable", "no_write_lease")
        assert time.monotonic() < deadline, answer.text
        time.sleep(0.2)
    center = next(b for b in health(api, "sh")["flow"]["breakers"] if b["call"] == "center")
    assert center["state"] == "closed" and center["opened"] >= 1


def test_the_forwarding_breaker_fails_fast_for_a_region_that_is_down(
    api: Api, control: Control, cluster: LocalCluster
) -> None:
    buyer = api.buyer_in("bj", 52_001)
    control.put("/v1/flow/breakers", {"calls_min": 3, "open_ms": 60_000})
    cluster.stop_region("bj")
    try:
        errors = [api.call("sh", "GET", "/v1/cart", buyer).json()["error"] for _ in range(6)]
        assert errors[:3] == ["region_unavailable"] * 3, errors
        assert errors[3:] == ["circuit_open"] * 3, errors
        answer = api.call("sh", "PUT", "/v1/cart/items/X-1", buyer, {"qty": 1})
        assert answer.status_code == 503 and answer.json()["call"] == "forward"
        assert answer.json()["region"] == "bj"
    finally:
        cluster.start_region("bj")
        cluster.wait_healthy(["bj"])
    control.put("/v1/flow/breakers", {"open_ms": 100})  # a changed rule, then a probe
    deadline = time.monotonic() + 15
    while api.call("sh", "GET", "/v1/cart", buyer).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_limits_kept_in_redis_on_a_live_cluster(tmp_path: Path) -> None:
    """[flow] storage = a Redis URL: the regions keep their schedules there (under the
    key prefix and their own names), and a client sees the same 429."""
    import redis

    from tests.support import require_redis

    url = require_redis()
    prefix = f"ut-test-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "topology.toml"
    flow = f'[flow]\nstorage = "{url}"\nkey_prefix = "{prefix}"\n'
    path.write_text(topology_toml(free_ports(4)) + flow)
    client = redis.Redis.from_url(url)
    try:
        with LocalCluster(load_config(path), tmp_path / "data", path) as running:
            running.start()
            with Api(running.config) as api:
                Control(api).limit("buyer", rate_per_s=0.1, burst=2)
                buyer = api.buyer_in("sh", 53_001)
                codes = [api.call("sh", "GET", "/v1/cart", buyer).status_code for _ in range(2)]
                assert codes == [200, 200]
                assert_limited(api.call("sh", "GET", "/v1/cart", buyer), "buyer")
                keys = {k.decode() for k in client.keys(f"{prefix}:sh:buyer:*")}
                assert any(k.endswith(f":{buyer}") for k in keys), keys
                assert health(api, "sh")["flow"]["storage"] == "redis"
                assert health(api, "sh")["flow"]["storage_errors"] == 0
    finally:
        keys = client.keys(f"{prefix}:*")
        if keys:
            client.delete(*keys)
        client.close()


def test_x_forwarded_for_is_not_believed_without_client_ip_header(tmp_path: Path) -> None:
    """A region believes a client address header only as `[flow] client_ip_header` and
    `trusted_proxies` say: with neither set, a client on 127.0.0.1 that names other
    addresses in X-Forwarded-For is still limited as 127.0.0.1 (uvicorn, left to itself,
    would have believed the header from 127.0.0.1)."""
    path = tmp_path / "topology.toml"
    limits = "\n[flow.limits.ip]\nrate_per_s = 0.1\nburst = 2\n"
    path.write_text(topology_toml(free_ports(4)) + limits)
    with LocalCluster(load_config(path), tmp_path / "data", path) as running:
        running.start(["hz"])
        with Api(running.config) as api:
            buyer = api.buyer_in("hz", 43_001)
            answers = [
                api.call("hz", "GET", "/v1/cart", buyer, headers=from_ip(fresh_ip()))
                for _ in range(3)
            ]
            assert [a.status_code for a in answers[:2]] == [200, 200], answers[1].text
            assert_limited(answers[2], "ip")
            assert "127.0.0.1" in answers[2].json()["message"]
