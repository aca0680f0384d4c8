"""The topology configuration: regions, cells, buckets, owners, addresses, storage.

Read from TOML; a built-in default (three regions `hz` (center), `sh`, `bj`; six unit cells)
is used when no file is given. Validation errors name the field and the problem.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import ssl
import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from unitrade.topology.flow_rules import FlowConfig

BUCKET_COUNT_DEFAULT = 100
BUCKET_COUNT_MAX = 10_000
CELL_ID_MAX = 1023  # the order ID holds 10 bits of cell (order_id.py)
REGION_NAME = re.compile(r"^[a-z][a-z0-9]{0,15}$")
SECRET_DEFAULT = "unitrade-local-dev-secret-change-me"
TOKEN_KEY_ID = r"^[a-z0-9][a-z0-9-]{0,15}$"
SQLITE_STORAGE_DEFAULT = "sqlite:///{data}/{region}/cell-{cell}.db"
CONTROL_LISTEN_DEFAULT = "127.0.0.1:8700"
CONTROL_STORAGE_DEFAULT = "sqlite:///{data}/control/control.db"
CONTROL_NAME = "control"  # how signed requests from the control plane name their sender
ETCD_PREFIX_DEFAULT = "/unitrade/"
ETCD_PREFIX = re.compile(r"^/[A-Za-z0-9_./-]{0,99}$")
ETCD_ENDPOINT = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}/?$")


# A listen address on one of these binds every address of the host: nobody can reach it
# there, so such a server needs an advertise address.
WILDCARD_HOSTS = ("0.0.0.0", "::")


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every bad field."""


class CellKind(StrEnum):
    UNIT = "unit"
    CENTER = "center"
    GLOBAL = "global"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT with a port in 1..65535, got {value!r}")
    return value


class _Listening(_Strict):
    """A server of the cluster: `listen` is the HOST:PORT it binds, `advertise` the
    HOST:PORT every other server, the CLI and clients reach it at (default: `listen`): they
    differ where something stands between them (NAT, a proxy, the fault-injecting proxy of
    unitrade/verify/network.py). With `tls_cert` and `tls_key` (PEM files) it serves HTTPS,
    and every other server and the CLI reach it so."""

    listen: str
    advertise: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @model_validator(mode="after")
    def _tls_pair(self) -> _Listening:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        return self

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _check_listen(value)

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        return None if value is None else _check_listen(value)

    @property
    def advertised(self) -> str:
        """The HOST:PORT others reach this server at."""
        return self.advertise or self.listen

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls_cert else "http"
        return f"{scheme}://{self.advertised}"

    def uvicorn_tls(self) -> dict[str, str]:
        """uvicorn's TLS options for this server (none without a certificate)."""
        if self.tls_cert is None or self.tls_key is None:
            return {}
        return {"ssl_certfile": self.tls_cert, "ssl_keyfile": self.tls_key}


# The schemes of a storage URL; MySQL/MariaDB may name its driver (storage/engine.py).
STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql", "mariadb")
MYSQL_DRIVERS = ("asyncmy", "aiomysql", "pymysql")


def _check_storage_scheme(value: str) -> None:
    scheme = value.split(":", 1)[0]
    base, _, driver = scheme.partition("+")
    if base not in STORAGE_SCHEMES or (driver and base not in ("mysql", "mariadb")):
        raise ValueError(f"scheme must be sqlite, postgresql, mysql or mariadb, got {scheme!r}")
    if driver and driver not in MYSQL_DRIVERS:
        raise ValueError(
            f"the MySQL driver must be one of {', '.join(MYSQL_DRIVERS)}, got {driver!r}"
        )


WORKERS_MAX = 64  # serving processes of one region


class RegionConfig(_Listening):
    name: str
    center: bool = False
    listen: str
    storage: str = SQLITE_STORAGE_DEFAULT
    # Reader connections (threads on SQLite and PostgreSQL) per cell copy, beside its one
    # writer: a region process opens up to cells x (1 + storage_readers) connections to its
    # database server (docs/operations.md: mind max_connections).
    storage_readers: Annotated[int, Field(ge=1, le=32)] = 4
    # Serving processes of the region, all behind its one `listen` address (SO_REUSEPORT)
    # over its one set of databases (docs/architecture.md, A region of many processes).
    # More than one needs a database server: PostgreSQL or MySQL/MariaDB, not SQLite.
    workers: Annotated[int, Field(ge=1, le=WORKERS_MAX)] = 1

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not REGION_NAME.match(value):
            raise ValueError("must be 1-16 lowercase letters or digits, starting with a letter")
        if value == CONTROL_NAME:
            raise ValueError(f"{CONTROL_NAME!r} is the control plane's name")
        return value

    @model_validator(mode="after")
    def _workers_need_a_server(self) -> RegionConfig:
        # SQLite's one write lock per database file, the inline write path and the file's
        # own WAL checkpoints are built for one process per copy; a region that needs more
        # than one core needs a database server anyway (docs/operations.md).
        if self.workers > 1 and self.storage.startswith("sqlite"):
            raise ValueError(
                f"workers = {self.workers} needs PostgreSQL or MySQL/MariaDB storage: on SQLite "
                "a region runs one process (set storage to a postgresql:// or mysql:// URL, "
                "or workers = 1)"
            )
        return self

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        _check_storage_scheme(value)
        if "{cell}" not in value:
            raise ValueError("must contain {cell}: every cell copy has a database of its own")
        return value

    def storage_url(self, cell_name: str, data_dir: Path) -> str:
        """The storage URL of this region's copy of a cell, placeholders filled in."""
        return self.storage.format(data=str(data_dir), region=self.name, cell=cell_name)


class ControlMember(_Listening):
    """One control plane process where several run (`[[control.members]]`, typically one
    per region): one of them is active at a time, elected through etcd."""

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not REGION_NAME.match(value):
            raise ValueError("must be 1-16 lowercase letters or digits, starting with a letter")
        return value


class LeaseAuthorityKind(StrEnum):
    CONTROL = "control"  # the control plane grants leases and keeps its state in `storage`
    ETCD = "etcd"  # an etcd cluster grants them and holds the control plane's state


class ControlConfig(_Listening):
    """The control plane (docs/architecture.md): where it listens, where it keeps the rule history
    and the operations log, and the limits of a switchover."""

    listen: str = CONTROL_LISTEN_DEFAULT
    storage: str = CONTROL_STORAGE_DEFAULT
    # Several control plane processes, one active by election (needs etcd); without
    # `members`, one process at `listen`.
    members: Annotated[list[ControlMember], Field(max_length=16)] = []
    # Who grants the regions' write leases and holds the control plane's state: the
    # control plane itself (its `storage`), or an etcd cluster (control/etcd.py).
    lease_authority: LeaseAuthorityKind = LeaseAuthorityKind.CONTROL
    etcd_endpoints: Annotated[list[str], Field(max_length=16)] = []
    # Every key unitrade writes in etcd starts with this (clusters may share an etcd).
    etcd_prefix: str = ETCD_PREFIX_DEFAULT
    # How long one request to an etcd member may take before the next member is tried
    # (a region's lease renewals use at most a sixth of lease_ms).
    etcd_timeout_ms: Annotated[int, Field(ge=50, le=30_000)] = 2_000
    # Pre-check: a switch is refused, before anything is banned, when the target's
    # replication lag for a moving cell is above this (in positions and in ms).
    lag_positions_max: Annotated[int, Field(ge=0, le=10_000_000)] = 5_000
    lag_ms_max: Annotated[int, Field(ge=0, le=600_000)] = 2_000
    # How long a switch waits for every acknowledgement of a rule, and for the target to
    # apply the final position; past either, it rolls back (before the new owner is
    # published) so that a cell never stays banned.
    ack_timeout_ms: Annotated[int, Field(ge=100, le=120_000)] = 5_000
    catch_up_timeout_ms: Annotated[int, Field(ge=100, le=600_000)] = 10_000
    # While a cell is banned, a gateway holds writes to it up to hold_ms (at most
    # hold_requests_max at a time), then sends them to the owner of the new rule.
    hold_ms: Annotated[int, Field(ge=0, le=30_000)] = 2_000
    hold_requests_max: Annotated[int, Field(ge=0, le=100_000)] = 1_000
    # Write leases (control/lease.py): a region writes its cells only while it holds one.
    # It renews every lease_renew_ms; cut off from the authority, it stops writing before
    # lease_ms has passed since its last renewal was sent.
    lease_ms: Annotated[int, Field(ge=500, le=60_000)] = 3_000
    lease_renew_ms: Annotated[int, Field(ge=50, le=20_000)] = 500
    # Clocks: how far two processes' clocks may run apart in rate (parts per million of
    # elapsed time; leases allow for it) and how far their wall clocks may be apart
    # (order-ID times after a failover allow for it). Regions that sign calls to each
    # other need their wall clocks within the signature window anyway (rpc/signing.py).
    clock_drift_ppm_max: Annotated[int, Field(ge=0, le=100_000)] = 10_000
    clock_offset_ms_max: Annotated[int, Field(ge=0, le=10_000)] = 500
    # Failover (control/failover.py): automatic when on, started by the health checker,
    # at most one per failover_interval_s.
    auto_failover: bool = False
    failover_interval_s: Annotated[int, Field(ge=0, le=86_400)] = 300

    @model_validator(mode="after")
    def _lease(self) -> ControlConfig:
        if self.lease_renew_ms * 3 > self.lease_ms:
            raise ValueError(
                f"lease_renew_ms ({self.lease_renew_ms}) must be at most a third of "
                f"lease_ms ({self.lease_ms}): a lease must survive a lost renewal or two"
            )
        return self

    @model_validator(mode="after")
    def _members_and_etcd(self) -> ControlConfig:
        given = self.model_fields_set
        if self.members and given & {"listen", "advertise", "tls_cert", "tls_key"}:
            raise ValueError(
                "give `listen` (one control plane) or `members` (several), not both; "
                "each member has its own listen, advertise, tls_cert and tls_key"
            )
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError("members: member names must be unique")
        if self.lease_authority is LeaseAuthorityKind.ETCD:
            if not self.etcd_endpoints:
                raise ValueError('lease_authority = "etcd" needs etcd_endpoints')
            if "storage" in given:
                raise ValueError(
                    'storage: with lease_authority = "etcd" the control plane keeps its '
                    "state in etcd; remove storage"
                )
        elif len(self.members) > 1:
            raise ValueError(
                'several control plane members need lease_authority = "etcd": they elect '
                "the active one through etcd"
            )
        return self

    @field_validator("etcd_endpoints")
    @classmethod
    def _etcd_endpoints(cls, value: list[str]) -> list[str]:
        for endpoint in value:
            if not ETCD_ENDPOINT.match(endpoint):
                raise ValueError(
                    f"an etcd endpoint is http(s)://HOST:PORT (a client URL), got {endpoint!r}"
                )
        if len(set(value)) != len(value):
            raise ValueError("etcd endpoints must be unique")
        return value

    @field_validator("etcd_prefix")
    @classmethod
    def _etcd_prefix(cls, value: str) -> str:
        if not ETCD_PREFIX.match(value):
            raise ValueError(
                "must start with / and hold only letters, digits and _ . - /, at most 100 "
                f"characters, got {value!r}"
            )
        return value if value.endswith("/") else value + "/"

    @property
    def etcd(self) -> bool:
        return self.lease_authority is LeaseAuthorityKind.ETCD

    @property
    def member_list(self) -> list[ControlMember]:
        """Every control plane process: the members, or the one at `listen`."""
        if self.members:
            return list(self.members)
        return [
            ControlMember(
                name=CONTROL_NAME,
                listen=self.listen,
                advertise=self.advertise,
                tls_cert=self.tls_cert,
                tls_key=self.tls_key,
            )
        ]

    def member(self, name: str) -> ControlMember:
        for member in self.member_list:
            if member.name == name:
                return member
        raise KeyError(f"unknown control plane member {name!r}")

    @property
    def urls(self) -> list[str]:
        """The control plane's addresses, tried in turn (the active one answers)."""
        return [m.base_url for m in self.member_list]

    @property
    def base_url(self) -> str:
        return self.member_list[0].base_url

    # The health checker (control/health.py) probes every region and cell each
    # health_interval_ms, each probe given health_timeout_ms at most; a region or cell is
    # down after health_failures_max failed probes in a row, up again after one good one.
    # health_orders = false leaves out the synthetic orders: cells are then judged by
    # their owner's /healthz alone, and the checker writes nothing.
    health_interval_ms: Annotated[int, Field(ge=100, le=60_000)] = 1_000
    health_timeout_ms: Annotated[int, Field(ge=10, le=30_000)] = 500
    health_failures_max: Annotated[int, Field(ge=1, le=100)] = 3
    health_orders: bool = True

    @model_validator(mode="after")
    def _health_timeout(self) -> ControlConfig:
        # A round of probes must end before the next one is due.
        if self.health_timeout_ms >= self.health_interval_ms:
            raise ValueError(
                f"health_timeout_ms ({self.health_timeout_ms}) must be below "
                f"health_interval_ms ({self.health_interval_ms})"
            )
        return self

    @field_validator("storage")
    @classmethod
    def _storage(cls, value: str) -> str:
        _check_storage_scheme(value)
        return value

    def storage_url(self, data_dir: Path) -> str:
        return self.storage.format(data=str(data_dir))


class TokenKey(_Strict):
    """A key that signs bearer tokens. The first key without `accept_until` issues new
    tokens; a key with `accept_until` (unix seconds) issues none and is still accepted
    until then: rotation with a grace period (add the new key first, give the old one an
    end, remove it after)."""

    id: Annotated[str, Field(pattern=TOKEN_KEY_ID)]
    secret: Annotated[str, Field(min_length=16)]
    accept_until: Annotated[int | None, Field(ge=0)] = None


class SecretsConfig(_Strict):
    """Three secrets, each of its own (`[secrets]`): the keys of buyer and admin tokens, the
    one that signs region-to-region calls, and the one that signs calls between the regions
    (or the CLI) and the control plane. Where one is not set it is derived from the
    top-level `secret` (a development shorthand); `production = true` refuses to start
    while any of them comes from the built-in development secret."""

    regions: Annotated[str | None, Field(min_length=16)] = None
    control: Annotated[str | None, Field(min_length=16)] = None
    token_keys: Annotated[list[TokenKey], Field(max_length=16)] = []
    production: bool = False

    @model_validator(mode="after")
    def _keys(self) -> SecretsConfig:
        ids = [k.id for k in self.token_keys]
        if len(set(ids)) != len(ids):
            raise ValueError("token_keys: key ids must be unique")
        if self.token_keys and all(k.accept_until is not None for k in self.token_keys):
            raise ValueError("token_keys: one key without accept_until must issue tokens")
        return self


class RetentionConfig(_Strict):
    """How long each table that grows keeps its rows (`[retention]`). Every bound is a
    number of rows and/or an age; the sweep runs every `sweep_interval_s` at each region
    for the copies it owns (business tables, through the fenced write path, so replicas
    follow) and for every copy it holds (its own changelog, which is local)."""

    # Changelog: a copy keeps at least the newest `changelog_positions_kept` positions and
    # every row younger than `changelog_age_s`; older rows go once every follower has
    # applied them. Past `changelog_positions_max` rows it trims regardless: a follower
    # that far behind is told `changelog_trimmed` and re-bootstraps from a snapshot.
    changelog_positions_kept: Annotated[int, Field(ge=0, le=100_000_000)] = 100_000
    changelog_age_s: Annotated[int, Field(ge=0, le=90 * 86_400)] = 86_400
    changelog_positions_max: Annotated[int, Field(ge=1_000, le=1_000_000_000)] = 2_000_000
    # Outbox steps that were sent (status done), idempotency keys, and finished stock
    # reservations (committed, released, returned) are deleted after these ages.
    outbox_done_s: Annotated[int, Field(ge=0, le=90 * 86_400)] = 86_400
    idempotency_keys_s: Annotated[int, Field(ge=60, le=90 * 86_400)] = 86_400
    reservations_finished_s: Annotated[int, Field(ge=0, le=90 * 86_400)] = 7 * 86_400
    # The center refuses a reserve for an order whose ID is older than this: a reserve
    # that arrives that late (a retry lost in the network) cannot bring back stock held
    # for a reservation the sweep deleted. A reservation is therefore also kept until it
    # is older than this plus a margin for clocks (services/retention.py).
    reserve_window_s: Annotated[int, Field(ge=5, le=3_600)] = 60
    # Payment claims at the center (services/payments.py) are deleted once this old: a
    # payment ID pays one order across the cluster within this window (and one order of
    # its unit cell for ever). At least an hour, far longer than a pay takes from its
    # claim to its write, and than any resend of it.
    payment_claims_s: Annotated[int, Field(ge=3_600, le=3650 * 86_400)] = 30 * 86_400
    # Quarantined changes (storage/quarantine.py) that reconcile has decided (reapplied,
    # conflict, superseded) are deleted from a copy's quarantine once this old; held ones
    # are kept until they are decided.
    quarantine_decided_s: Annotated[int, Field(ge=0, le=3650 * 86_400)] = 90 * 86_400
    # A flash sale's rows (its definition and segments at the center, its tokens in the
    # buyers' cells) and a coupon's (its definition and claims) are deleted once the sale
    # or the coupon ended this long ago. Until then the sale's SKU is orderable only with
    # its tokens; afterwards it is an ordinary SKU again.
    sales_ended_s: Annotated[int, Field(ge=0, le=3650 * 86_400)] = 7 * 86_400
    coupons_ended_s: Annotated[int, Field(ge=0, le=3650 * 86_400)] = 30 * 86_400
    # The health checker's synthetic orders (topology/probes.py) are deleted at their
    # owner once this old, at the next sweep.
    probe_orders_s: Annotated[int, Field(ge=0, le=3_600)] = 10
    # Finished operations (switchovers) in the control store: the newest
    # `operations_kept` are kept, older ones once they are `operations_s` old.
    operations_kept: Annotated[int, Field(ge=1, le=1_000_000)] = 1_000
    operations_s: Annotated[int, Field(ge=0, le=3650 * 86_400)] = 90 * 86_400
    # Rows deleted per statement, so a sweep never holds a write lock for long.
    sweep_batch_rows: Annotated[int, Field(ge=10, le=100_000)] = 1_000
    sweep_interval_s: Annotated[float, Field(ge=0.1, le=86_400)] = 60.0

    @model_validator(mode="after")
    def _kept_below_max(self) -> RetentionConfig:
        _check_kept_below_max(self.changelog_positions_kept, self.changelog_positions_max)
        return self


def _check_kept_below_max(kept: int, rows_max: int) -> None:
    # Otherwise the hard bound would trim what the keep rule promises to keep.
    if kept > rows_max:
        raise ValueError(
            f"changelog_positions_kept ({kept}) must not exceed changelog_positions_max "
            f"({rows_max})"
        )


class CellRetention(_Strict):
    """A cell's own changelog retention (`[cells.retention]`): each field left out takes
    the value of `[retention]`. A busy cell may keep fewer positions, a cell whose replicas
    are often far away (a region on a slow link) more."""

    changelog_positions_kept: Annotated[int, Field(ge=0, le=100_000_000)] | None = None
    changelog_age_s: Annotated[int, Field(ge=0, le=90 * 86_400)] | None = None
    changelog_positions_max: Annotated[int, Field(ge=1_000, le=1_000_000_000)] | None = None


class ChangelogPolicy(_Strict):
    """What one cell's copies keep of their changelog: `[retention]` with the cell's
    overrides applied."""

    positions_kept: int
    age_s: int
    positions_max: int


class CellConfig(_Strict):
    id: Annotated[int, Field(ge=1, le=CELL_ID_MAX)]
    kind: CellKind
    owner: str
    buckets: str = ""
    partition: str = "normal"
    retention: CellRetention | None = None

    @property
    def name(self) -> str:
        return cell_name(self.id, self.kind)

    def bucket_list(self) -> list[int]:
        return parse_bucket_ranges(self.buckets)


def cell_name(cell_id: int, kind: CellKind) -> str:
    """Unit cells are `u<id>`; there is one center and one global cell, named by kind."""
    return f"u{cell_id}" if kind is CellKind.UNIT else kind.value


def parse_bucket_ranges(text: str) -> list[int]:
    """`"0-16,40,42-44"` -> [0..16, 40, 42, 43, 44]."""
    buckets: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad bucket range {part!r}: use N or N-M")
        first, last = int(low), int(high) if sep else int(low)
        if last < first:
            raise ValueError(f"bad bucket range {part!r}: end before start")
        buckets.extend(range(first, last + 1))
    return buckets


class TopologyConfig(_Strict):
    bucket_count: Annotated[int, Field(ge=1, le=BUCKET_COUNT_MAX)] = BUCKET_COUNT_DEFAULT
    secret: Annotated[str, Field(min_length=16)] = SECRET_DEFAULT
    # The CA (PEM) that signed the servers' TLS certificates, trusted by every region, the
    # control plane and the CLI; without it the system's trust store is used.
    tls_ca: str | None = None
    regions: Annotated[list[RegionConfig], Field(min_length=1)]
    cells: Annotated[list[CellConfig], Field(min_length=3)]
    control: ControlConfig = ControlConfig()
    retention: RetentionConfig = RetentionConfig()
    secrets: SecretsConfig = SecretsConfig()
    # Rate limits, overload protection, breakers and degradation switches: their first
    # values (topology/flow_rules.py); after the first start the control plane's.
    flow: FlowConfig = FlowConfig()

    @model_validator(mode="after")
    def _consistent(self) -> TopologyConfig:
        problems: list[str] = []
        names = [r.name for r in self.regions]
        if len(set(names)) != len(names):
            problems.append("regions: region names must be unique")
        centers = [r.name for r in self.regions if r.center]
        if len(centers) != 1:
            problems.append(f"regions: exactly one region must be center, found {centers}")
        servers = [*self.regions, *self.control.member_list]
        # Servers on hosts of their own may all bind the same 0.0.0.0:8701; two that share
        # a listen address must then each be advertised at an address of its own (one
        # host cannot bind one address twice).
        listens = [s.listen for s in servers if s.advertise is None]
        shared = {s.listen for s in servers if s.advertise is not None}
        if len(set(listens)) != len(listens) or shared & set(listens):
            problems.append(
                "regions, control: listen addresses must be unique (servers on hosts of "
                "their own may share one if each has an advertise address)"
            )
        for server in servers:
            if server.advertise is None and server.host.strip("[]") in WILDCARD_HOSTS:
                problems.append(
                    f"listen {server.listen} binds every address of its host: give "
                    "advertise = HOST:PORT, the address the others reach it at"
                )
        advertised = [s.advertised for s in servers]
        if len(set(advertised)) != len(advertised):
            problems.append("regions, control: advertise addresses must be unique")
        for server in servers:
            if any(server.advertised == o.listen for o in servers if o is not server):
                problems.append(
                    f"{server.advertised}: advertised by one server, listened on by another"
                )
        ids = [c.id for c in self.cells]
        if len(set(ids)) != len(ids):
            problems.append("cells: cell ids must be unique")
        for kind in (CellKind.CENTER, CellKind.GLOBAL):
            count = sum(1 for c in self.cells if c.kind is kind)
            if count != 1:
                problems.append(f"cells: exactly one {kind.value} cell is required, found {count}")
        if not any(c.kind is CellKind.UNIT for c in self.cells):
            problems.append("cells: at least one unit cell is required")
        for index, cell in enumerate(self.cells):
            if cell.owner not in names:
                problems.append(f"cells.{index}.owner: unknown region {cell.owner!r}")
            policy = self.changelog_policy(cell.id)
            try:
                _check_kept_below_max(policy.positions_kept, policy.positions_max)
            except ValueError as exc:
                problems.append(f"cells.{index}.retention: {exc}")
            if cell.kind is not CellKind.UNIT and cell.buckets:
                problems.append(f"cells.{index}.buckets: only unit cells hold buckets")
        problems.extend(self._bucket_problems())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _bucket_problems(self) -> list[str]:
        owner_of_bucket: dict[int, int] = {}
        problems: list[str] = []
        for index, cell in enumerate(self.cells):
            try:
                buckets = cell.bucket_list()
            except ValueError as exc:
                problems.append(f"cells.{index}.buckets: {exc}")
                continue
            for bucket in buckets:
                if bucket >= self.bucket_count:
                    problems.append(
                        f"cells.{index}.buckets: bucket {bucket} >= bucket_count "
                        f"{self.bucket_count}"
                    )
                elif bucket in owner_of_bucket:
                    problems.append(
                        f"cells.{index}.buckets: bucket {bucket} is already assigned to cell "
                        f"{owner_of_bucket[bucket]}"
                    )
                else:
                    owner_of_bucket[bucket] = cell.id
        missing = sorted(set(range(self.bucket_count)) - owner_of_bucket.keys())
        if missing and not problems:
            problems.append(f"cells: buckets not assigned to any unit cell: {_ranges(missing)}")
        return problems

    # -- lookups -------------------------------------------------------------------------

    def region(self, name: str) -> RegionConfig:
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"unknown region {name!r}")

    @property
    def region_names(self) -> list[str]:
        return [r.name for r in self.regions]

    @functools.cached_property
    def _signers(self) -> frozenset[str]:
        # Cached: every signed call looks its peer up here (link_secret), on both ends.
        return frozenset((*self.region_names, CONTROL_NAME))

    def with_workers(self, name: str, workers: int) -> TopologyConfig:
        """This topology with region `name` run by `workers` processes (`unitrade serve
        --workers`), validated as if the file said so."""
        regions = [
            {**r.model_dump(), "workers": workers} if r.name == name else r.model_dump()
            for r in self.regions
        ]
        try:
            return TopologyConfig.model_validate({**self.model_dump(), "regions": regions})
        except ValidationError as exc:
            raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from exc

    @property
    def center_region(self) -> str:
        return next(r.name for r in self.regions if r.center)

    def cell(self, cell_id: int) -> CellConfig:
        for cell in self.cells:
            if cell.id == cell_id:
                return cell
        raise KeyError(f"unknown cell {cell_id}")

    def changelog_policy(self, cell_id: int) -> ChangelogPolicy:
        """The changelog retention of a cell: its own overrides, else `[retention]`."""
        default = self.retention
        own = self.cell(cell_id).retention or CellRetention()
        kept, age_s, rows_max = (
            own.changelog_positions_kept,
            own.changelog_age_s,
            own.changelog_positions_max,
        )
        return ChangelogPolicy(
            positions_kept=default.changelog_positions_kept if kept is None else kept,
            age_s=default.changelog_age_s if age_s is None else age_s,
            positions_max=default.changelog_positions_max if rows_max is None else rows_max,
        )

    def cell_by_kind(self, kind: CellKind) -> CellConfig:
        return next(c for c in self.cells if c.kind is kind)

    def find_cell(self, text: str) -> CellConfig:
        """A cell by id (`3`) or name (`u3`, `center`, `global`)."""
        for cell in self.cells:
            if text in (str(cell.id), cell.name):
                return cell
        raise KeyError(f"unknown cell {text!r}")

    # -- secrets --------------------------------------------------------------------------

    @property
    def region_secret(self) -> str:
        return self.secrets.regions or _derived(self.secret, "regions")

    @property
    def control_secret(self) -> str:
        return self.secrets.control or _derived(self.secret, "control")

    @property
    def token_keys(self) -> list[TokenKey]:
        if self.secrets.token_keys:
            return list(self.secrets.token_keys)
        return [TokenKey(id="k0", secret=_derived(self.secret, "tokens"))]

    @property
    def http_verify(self) -> ssl.SSLContext | bool:
        """What an HTTP client of this cluster verifies servers' certificates with: the
        cluster's CA where one is set, else the system's trust store."""
        if self.tls_ca is None:
            return True
        return ssl.create_default_context(cafile=self.tls_ca)

    def link_secret(self, sender: str, receiver: str) -> str | None:
        """The secret that signs calls from `sender` to `receiver` (regions or the control
        plane); None when either is not part of this cluster."""
        known = self._signers
        if sender == receiver or sender not in known or receiver not in known:
            return None
        if CONTROL_NAME in (sender, receiver):
            return self.control_secret
        return self.region_secret

    def development_secrets(self) -> list[str]:
        """Which secrets come from the built-in development secret (empty in production)."""
        if self.secret != SECRET_DEFAULT:
            return []
        derived = {
            "tokens": not self.secrets.token_keys,
            "regions": self.secrets.regions is None,
            "control": self.secrets.control is None,
        }
        return [name for name, is_derived in derived.items() if is_derived]


def development_warning(config: TopologyConfig) -> str | None:
    """What to say loudly when a cluster runs on the built-in development secret."""
    weak = config.development_secrets()
    if not weak:
        return None
    return (
        f"INSECURE: the {', '.join(weak)} secret(s) come from the built-in development "
        "secret, which anyone can read in the source: anyone can mint tokens and sign "
        "region calls. Set `secret` or [secrets] in the topology file; "
        "`unitrade up --production` or `[secrets] production = true` refuses to start so."
    )


class DevelopmentSecret(ConfigError):
    """Production was asked for, and a secret is the built-in development one."""


def check_production(config: TopologyConfig, production: bool = False) -> str | None:
    """Refuse (DevelopmentSecret) a development secret where production is asked for;
    otherwise the warning to print, if any."""
    warning = development_warning(config)
    if warning is not None and (production or config.secrets.production):
        raise DevelopmentSecret(
            f"refusing to start in production with the development secret: {warning}"
        )
    return warning


@functools.lru_cache(maxsize=64)
def _derived(secret: str, purpose: str) -> str:
    """A secret of its own for each purpose from the one shorthand: a token key never
    signs a region call, and the other way round."""
    # Cached: every signed call asks for its link's secret (a profile found this HMAC on
    # the request path).
    return hmac.new(secret.encode(), f"unitrade/{purpose}".encode(), hashlib.sha256).hexdigest()


def _ranges(values: list[int]) -> str:
    parts: list[str] = []
    start = prev = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if value is not None:
            start = prev = value
    return ",".join(parts)


def default_config() -> TopologyConfig:
    """Three regions on loopback, hz the center; six unit cells, two owned by each region."""
    regions = [
        RegionConfig(name="hz", center=True, listen="127.0.0.1:8701"),
        RegionConfig(name="sh", listen="127.0.0.1:8702"),
        RegionConfig(name="bj", listen="127.0.0.1:8703"),
    ]
    owners = ["hz", "hz", "sh", "sh", "bj", "bj"]
    cells = [
        CellConfig(id=i + 1, kind=CellKind.UNIT, owner=owner, buckets=_even_share(i, 6))
        for i, owner in enumerate(owners)
    ]
    cells.append(CellConfig(id=1000, kind=CellKind.CENTER, owner="hz"))
    cells.append(CellConfig(id=1001, kind=CellKind.GLOBAL, owner="hz"))
    return TopologyConfig(regions=regions, cells=cells)


def _even_share(index: int, parts: int, total: int = BUCKET_COUNT_DEFAULT) -> str:
    first = index * total // parts
    last = (index + 1) * total // parts - 1
    return f"{first}-{last}"


def load_config(path: Path | None) -> TopologyConfig:
    """Load and validate a TOML topology; `None` gives the built-in default."""
    if path is None:
        return default_config()
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "config") -> TopologyConfig:
    data = dict(raw)
    regions = data.get("regions")
    if isinstance(regions, dict):
        # TOML reads naturally as [regions.hz]; the model wants a list with names.
        data["regions"] = [
            {"name": name, **body} if isinstance(body, dict) else body
            for name, body in regions.items()
        ]
    try:
        return TopologyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from exc


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{where}: {message}"
