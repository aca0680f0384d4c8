from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import free_ports, topology_toml
from unitrade.topology.config import (
    SECRET_DEFAULT,
    CellKind,
    ConfigError,
    default_config,
    load_config,
    parse_config,
)


def test_default_topology_is_three_regions_six_unit_cells() -> None:
    config = default_config()
    assert config.region_names == ["hz", "sh", "bj"]
    assert config.center_region == "hz"
    assert [r.listen for r in config.regions] == [
        "127.0.0.1:8701",
        "127.0.0.1:8702",
        "127.0.0.1:8703",
    ]
    units = [c for c in config.cells if c.kind is CellKind.UNIT]
    assert len(units) == 6
    for region in ("hz", "sh", "bj"):
        assert sum(1 for c in units if c.owner == region) == 2
    assert config.cell_by_kind(CellKind.CENTER).owner == "hz"
    assert config.cell_by_kind(CellKind.GLOBAL).owner == "hz"
    assert config.bucket_count == 100
    buckets = sorted(b for c in units for b in c.bucket_list())
    assert buckets == list(range(100))


def test_load_config_from_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    ports = free_ports(3)
    path.write_text(topology_toml(ports))
    config = load_config(path)
    assert config.region("sh").port == ports[1]
    assert config.find_cell("u3").owner == "sh"
    assert config.find_cell("1000").kind is CellKind.CENTER
    assert config.secret != SECRET_DEFAULT and config.secret in path.read_text()
    assert load_config(path).secret == config.secret
    assert topology_toml(ports) != topology_toml(ports)  # a secret of its own each time


def test_no_file_means_the_default() -> None:
    assert load_config(None) == default_config()


def _raw() -> dict:  # type: ignore[type-arg]
    import tomllib

    return tomllib.loads(topology_toml([9001, 9002, 9003]))


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["cells"][0].update(owner="xx"), "cells.0.owner: unknown region 'xx'"),
        (lambda r: r["cells"][1].update(buckets="0-20"), "bucket 0 is already assigned"),
        (lambda r: r["cells"][0].update(buckets="0-10"), "not assigned to any unit cell"),
        (lambda r: r["regions"]["sh"].update(center=True), "exactly one region must be center"),
        (lambda r: r["regions"]["sh"].update(listen="nowhere"), "regions.1.listen"),
        (lambda r: r["regions"]["sh"].update(storage="oracle://x/{cell}"), "scheme must be"),
        (
            lambda r: r["regions"]["sh"].update(storage="mysql+mysqlconnector://x/{cell}"),
            "the MySQL driver must be",
        ),
        (lambda r: r["regions"]["sh"].update(storage="sqlite:///x.db"), "must contain {cell}"),
        (lambda r: r["regions"]["sh"].update(storage_readers=0), "regions.1.storage_readers"),
        (lambda r: r["regions"]["sh"].update(storage_readers=33), "regions.1.storage_readers"),
        (lambda r: r["regions"]["sh"].update(colour="red"), "regions.1.colour: Extra inputs"),
        (lambda r: r["regions"]["sh"].update(workers=0), "regions.1.workers"),
        (lambda r: r["regions"]["sh"].update(workers=65), "regions.1.workers"),
        (
            lambda r: r["regions"]["sh"].update(workers=2),
            "regions.1: workers = 2 needs PostgreSQL or MySQL/MariaDB storage",
        ),
        (lambda r: r["cells"][0].update(kind="shard"), "cells.0.kind"),
        (lambda r: r["cells"][6].update(buckets="1"), "only unit cells hold buckets"),
        (lambda r: r.update(bucket_count=0), "bucket_count"),
        (lambda r: r["cells"][0].update(buckets="5-1"), "end before start"),
        (lambda r: r["cells"].pop(6), "exactly one center cell"),
        (lambda r: r["cells"][0].update(id=2), "cell ids must be unique"),
        (lambda r: r["regions"]["bj"].update(listen="127.0.0.1:9001"), "listen addresses"),
        (lambda r: r["regions"]["sh"].update(advertise="sh"), "regions.1.advertise"),
        (lambda r: r["regions"]["sh"].update(advertise="h:0"), "port in 1..65535"),
        (lambda r: r["regions"]["bj"].update(advertise="127.0.0.1:9002"), "listened on"),
        (
            lambda r: [r["regions"][n].update(advertise="10.0.0.1:80") for n in ("sh", "bj")],
            "advertise addresses must be unique",
        ),
        (lambda r: r["regions"]["sh"].update(listen="0.0.0.0:8701"), "binds every address"),
        (lambda r: r["regions"]["sh"].update(listen="[::]:8701"), "binds every address"),
        (
            lambda r: [
                r["regions"]["sh"].update(listen="0.0.0.0:8701", advertise="10.0.0.2:8701"),
                r["regions"]["bj"].update(listen="0.0.0.0:8701"),
            ],
            "listen addresses must be unique",
        ),
    ],
)
def test_validation_errors_name_the_field_and_the_problem(mutate, expected) -> None:  # type: ignore[no-untyped-def]
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError) as error:
        parse_config(raw, source="t.toml")
    assert expected in str(error.value)
    assert str(error.value).startswith("t.toml: ")


def test_regions_may_each_have_another_engine() -> None:
    raw = _raw()
    raw["regions"]["hz"]["storage"] = "postgresql://u@db-hz/ut_{region}_{cell}"
    raw["regions"]["sh"]["storage"] = "mysql://u:pw@db-sh:3306/ut_{region}_{cell}"
    raw["regions"]["sh"]["storage_readers"] = 2
    raw["regions"]["bj"]["storage"] = "mariadb+aiomysql://u@db-bj/ut_{region}_{cell}"
    config = parse_config(raw)
    assert config.region("sh").storage_url("u3", Path("/d")) == "mysql://u:pw@db-sh:3306/ut_sh_u3"
    assert config.region("sh").storage_readers == 2
    assert config.region("hz").storage_readers == 4  # the default


def test_a_region_of_many_processes_on_a_database_server() -> None:
    raw = _raw()
    raw["regions"]["hz"]["storage"] = "postgresql://u@db-hz/ut_{region}_{cell}"
    raw["regions"]["hz"]["workers"] = 4
    raw["regions"]["sh"]["storage"] = "mysql://u@db-sh/ut_{region}_{cell}"
    config = parse_config(raw)
    assert [r.workers for r in config.regions] == [4, 1, 1]  # 1 by default
    assert config.with_workers("sh", 3).region("sh").workers == 3
    with pytest.raises(ConfigError, match="workers = 2 needs PostgreSQL"):
        config.with_workers("bj", 2)  # SQLite


def test_unreadable_and_invalid_toml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[regions\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def _with_control(**control: object) -> dict:  # type: ignore[type-arg]
    raw = _raw()
    raw["control"] = control
    return raw


ETCD = {"lease_authority": "etcd", "etcd_endpoints": ["http://127.0.0.1:2379"]}
MEMBERS = [
    {"name": "hz", "listen": "127.0.0.1:8711"},
    {"name": "sh", "listen": "127.0.0.1:8712"},
]


def test_the_control_plane_on_etcd_with_a_member_per_region() -> None:
    config = parse_config(_with_control(**ETCD, members=MEMBERS, etcd_prefix="/shop-a"))
    control = config.control
    assert control.etcd and control.etcd_prefix == "/shop-a/"
    assert control.urls == ["http://127.0.0.1:8711", "http://127.0.0.1:8712"]
    assert control.base_url == "http://127.0.0.1:8711"
    assert control.member("sh").port == 8712
    # The single-address form is unchanged: one member at `listen`.
    single = parse_config(_raw()).control
    assert not single.etcd and single.urls == [single.base_url]


@pytest.mark.parametrize(
    ("control", "expected"),
    [
        ({"members": MEMBERS}, 'several control plane members need lease_authority = "etcd"'),
        ({"lease_authority": "etcd"}, "needs etcd_endpoints"),
        ({**ETCD, "storage": "sqlite:///x.db"}, "keeps its state in etcd"),
        ({**ETCD, "members": MEMBERS, "listen": "127.0.0.1:9"}, "not both"),
        ({**ETCD, "etcd_endpoints": ["127.0.0.1:2379"]}, "http(s)://HOST:PORT"),
        ({**ETCD, "etcd_prefix": "no-slash"}, "control.etcd_prefix: must start with /"),
        ({"lease_authority": "zookeeper"}, "control.lease_authority"),
        ({**ETCD, "members": [MEMBERS[0], MEMBERS[0]]}, "member names must be unique"),
        (
            {**ETCD, "members": [MEMBERS[0], {"name": "bj", "listen": "127.0.0.1:9001"}]},
            "listen addresses must be unique",
        ),
    ],
)
def test_bad_control_plane_settings_are_named(control: dict, expected: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError) as error:
        parse_config(_with_control(**control))
    assert expected in str(error.value)


def test_a_server_is_reached_at_its_advertised_address_and_binds_its_listen() -> None:
    raw = _raw()
    raw["regions"]["sh"]["advertise"] = "sh.example.net:443"
    raw["control"] = {"listen": "127.0.0.1:9004", "advertise": "10.1.2.3:8700"}
    config = parse_config(raw)
    sh = config.region("sh")
    assert (sh.host, sh.port) == ("127.0.0.1", 9002)
    assert sh.base_url == "http://sh.example.net:443"
    assert config.region("hz").base_url == "http://127.0.0.1:9001"  # default: listen
    assert config.control.base_url == "http://10.1.2.3:8700"
    assert config.control.member_list[0].port == 9004


def test_regions_on_hosts_of_their_own_may_bind_the_same_address_when_advertised() -> None:
    """One host per region: each binds 0.0.0.0:8701 and is reached at its own address."""
    raw = _raw()
    for n, name in enumerate(("hz", "sh", "bj"), 1):
        raw["regions"][name].update(listen="0.0.0.0:8701", advertise=f"10.0.0.{n}:8701")
    config = parse_config(raw)
    assert [r.base_url for r in config.regions] == [
        "http://10.0.0.1:8701",
        "http://10.0.0.2:8701",
        "http://10.0.0.3:8701",
    ]
    assert {(r.host, r.port) for r in config.regions} == {("0.0.0.0", 8701)}


def test_the_example_topology_of_a_production_deployment_is_valid(tmp_path: Path) -> None:
    """docs/deploy/topology.example.toml, with its placeholders filled, is a valid topology
    of regions on hosts of their own (the docs must not drift from the code)."""
    example = Path(__file__).parent.parent / "docs" / "deploy" / "topology.example.toml"
    text = example.read_text().replace("REPLACE: openssl rand -hex 32", "f" * 64)
    path = tmp_path / "topology.toml"
    path.write_text(text.replace("REPLACE", "password"))
    config = load_config(path)
    assert config.secrets.production and not config.development_secrets()
    assert {r.listen for r in config.regions} == {"0.0.0.0:8701"}
    assert len({r.base_url for r in config.regions}) == 3
