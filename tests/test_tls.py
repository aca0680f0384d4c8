"""A cluster with TLS on every link: regions and the control plane serve HTTPS with
certificates of the cluster's own CA, and every client (regions, CLI, tests) verifies them."""

from __future__ import annotations

import shutil
import subprocess
import time
import tomllib
import uuid
from pathlib import Path

import httpx
import pytest

from tests.support import Api, free_ports, topology_toml
from unitrade.cluster import LocalCluster
from unitrade.topology.config import parse_config

pytestmark = pytest.mark.cluster


def make_ca_and_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A CA of this test only, and a certificate it signed for 127.0.0.1."""
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    subject_ca = f"/CN=unitrade test CA {uuid.uuid4().hex[:8]}"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject_ca,
        "-keyout", str(ca_key), "-out", str(ca_cert),
    )  # fmt: skip
    run(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "2", "-out", str(cert), "-extfile", str(extensions),
    )  # fmt: skip
    return ca_cert, cert, key


def tls_topology(directory: Path) -> Path:
    ca, cert, key = make_ca_and_certificate(directory)
    lines = [f'tls_ca = "{ca}"']
    for line in topology_toml(free_ports(4)).splitlines():
        lines.append(line)
        if line.startswith("listen = "):
            lines += [f'tls_cert = "{cert}"', f'tls_key = "{key}"']
    path = directory / "topology.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_a_cluster_with_tls_between_regions(tmp_path: Path) -> None:
    path = tls_topology(tmp_path)
    config = parse_config(tomllib.loads(path.read_text()))
    assert all(r.base_url.startswith("https://") for r in config.regions)
    assert config.control.base_url.startswith("https://")
    with LocalCluster(config, tmp_path / "data", path) as cluster:
        cluster.start()  # waits for every server's /healthz over HTTPS
        api = Api(config)
        sku = f"TLS-{uuid.uuid4().hex[:8]}"
        api.put_product(sku, stock=5, region="sh")  # forwarded sh -> hz over TLS
        buyer = api.buyer_in("bj", 1)
        created = api.order("hz", buyer, [(sku, 2)])  # forwarded hz -> bj over TLS
        assert created.status_code == 201, created.text
        assert created.headers["x-unitrade-forwarded-by"] == "hz"
        order_id = created.json()["order_id"]
        deadline = time.monotonic() + 15
        for region in ("hz", "sh", "bj"):  # replicated over TLS to every region
            target = f"/v1/orders/{order_id}?consistency=replica"
            while (read := api.call(region, "GET", target, buyer)).status_code == 404:
                assert time.monotonic() < deadline, f"{region} never got {order_id}"
                time.sleep(0.05)
            assert read.status_code == 200 and read.json()["order_id"] == order_id
        # Plain HTTP is not served, and a client that does not trust the CA is refused.
        with pytest.raises(httpx.HTTPError):
            httpx.get(config.region("hz").base_url.replace("https", "http") + "/healthz")
        with pytest.raises(httpx.ConnectError):
            httpx.get(config.region("hz").base_url + "/healthz")
        api.http.close()
