"""The control plane's HTTP API.

Operators (the CLI, a console) use `/v1/...` with the admin token. Regions use
`/internal/control/watch`, signed with the control secret (rpc/signing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request, Security
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.routing import Route

from unitrade import __version__
from unitrade.control.agent import WATCH_WAIT_MS
from unitrade.control.board import RuleBoard
from unitrade.control.election import Election, LeaderGate
from unitrade.control.plane import ControlPlane
from unitrade.control.store import OPERATIONS_LIST_MAX
from unitrade.errors import Forbidden, InvalidRequest, NotFound, SwitchRefused, Unauthorized
from unitrade.rpc.signing import Verifier
from unitrade.topology.config import CONTROL_NAME, WORKERS_MAX, TopologyConfig
from unitrade.topology.flow_rules import LIMITS, SWITCHES, FlowRules, LimitMode
from unitrade.web.responses import (
    BEARER,
    TELEMETRY_OFF,
    error_responses,
    install_error_handlers,
    json_response,
)
from unitrade.web.tokens import read_authorization

CELLS_MAX = 1024
# Every error of the operator API is an `Error` body, as the regions' are.
ADMIN_ERRORS = error_responses(401, 403, 404, 422)
OPERATION_ERRORS = error_responses(400, 401, 403, 404, 409, 422)
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
WAIT_S_MAX = 60.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SwitchRequest(_Body):
    cells: Annotated[list[Annotated[str, Field(max_length=16)]], Field(min_length=1, max_length=64)]
    to: Annotated[str, Field(max_length=16)]


class EvacuateRequest(_Body):
    region: Annotated[str, Field(max_length=16)]
    to: Annotated[str, Field(max_length=16)]


class FailoverRequest(_Body):
    region: Annotated[str, Field(max_length=16)]
    to: Annotated[list[Annotated[str, Field(max_length=16)]], Field(max_length=64)] = []
    force: bool = False


class WatchCall(_Body):
    region: Annotated[str, Field(max_length=16)]
    worker: Annotated[int, Field(ge=0, lt=WORKERS_MAX)] = 0  # which process of the region
    after: Annotated[int, Field(ge=0)]
    acked: dict[Annotated[str, Field(max_length=16)], Annotated[int, Field(ge=0)]]
    wait_ms: Annotated[int, Field(ge=0, le=WATCH_WAIT_MS)]


class LeaseCall(_Body):
    region: Annotated[str, Field(max_length=16)]
    worker: Annotated[int, Field(ge=0, lt=WORKERS_MAX)] = 0
    rule_version: Annotated[int, Field(ge=0)]


class LimitChange(_Body):
    """The fields of a limit to change (topology/flow_rules.py Limit); the rest stay."""

    enabled: bool | None = None
    rate_per_s: Annotated[float, Field(gt=0)] | None = None
    burst: Annotated[int, Field(ge=1)] | None = None
    mode: LimitMode | None = None
    warm_up_s: Annotated[float, Field(gt=0)] | None = None
    cold_factor: Annotated[float, Field(ge=1)] | None = None
    queue_ms_max: Annotated[int, Field(ge=1)] | None = None
    queue_max: Annotated[int, Field(ge=1)] | None = None
    concurrency_max: Annotated[int, Field(ge=0)] | None = None
    overrides: Annotated[dict[str, float], Field(max_length=1_000)] | None = None


class SwitchChange(_Body):
    on: bool


class OverloadChange(_Body):
    enabled: bool | None = None
    loop_delay_ms_max: Annotated[int, Field(ge=1)] | None = None
    in_flight_max: Annotated[int, Field(ge=0)] | None = None


class BreakersChange(_Body):
    enabled: bool | None = None
    window_ms: Annotated[int, Field(ge=100)] | None = None
    calls_min: Annotated[int, Field(ge=1)] | None = None
    error_ratio_max: Annotated[float, Field(gt=0, le=1)] | None = None
    slow_ratio_max: Annotated[float, Field(gt=0, le=1)] | None = None
    slow_ms: Annotated[int, Field(ge=1)] | None = None
    open_ms: Annotated[int, Field(ge=10)] | None = None
    probes: Annotated[int, Field(ge=1)] | None = None


CallT = TypeVar("CallT", bound=_Body)


def build_control_app(
    config: TopologyConfig, plane: ControlPlane, election: Election | None = None
) -> FastAPI:
    """The API of one control plane process; with `election` (several members on etcd) it
    starts its control plane only while elected, and answers `not_leader` otherwise."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if election is None:
            await plane.start()
            try:
                yield
            finally:
                await plane.stop()
            return
        campaign = asyncio.create_task(election.run(plane.start, plane.stop), name="election")
        try:
            yield
        finally:
            campaign.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await campaign
            if election.leader_revision:
                await plane.stop()
            await election.resign()

    app = FastAPI(
        title="unitrade control plane",
        version=__version__,
        summary="rules, acknowledgements and switchovers of a unitrade cluster",
        lifespan=lifespan,
        telemetry=TELEMETRY_OFF,
    )
    install_error_handlers(app)
    if election is not None:
        app.add_middleware(LeaderGate, election=election)
    keys = config.token_keys
    verifier = Verifier(CONTROL_NAME, lambda sender: config.link_secret(sender, CONTROL_NAME))

    def admin(request: Request) -> None:
        principal = read_authorization(keys, request.headers.get("authorization"))
        if not principal.admin:
            raise Forbidden("the control plane needs the admin token")

    Admin = Depends(admin)
    # Documented, not enforced, by the bearer scheme: `admin` answers 401/403 itself.
    admin_only = [Admin, Security(BEARER)]

    def board() -> RuleBoard:
        assert plane.board is not None
        return plane.board

    def cell_ids(texts: list[str]) -> list[int]:
        ids: list[int] = []
        for text in texts:
            try:
                ids.append(config.find_cell(text.strip()).id)
            except KeyError:
                raise InvalidRequest(f"unknown cell {text!r}") from None
        if len(set(ids)) != len(ids):
            raise InvalidRequest("a cell is named twice")
        return ids

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> Response:
        rule = board().rule
        running = plane.running
        return json_response(
            {
                "status": "ok",
                "rule_version": rule.version,
                "development_secrets": config.development_secrets(),
                "banned": [rule.cells[c].name for c in sorted(rule.banned)],
                "ahead": board().ahead(),
                "running": running.op.id if running is not None else None,
                **(election.status() if election is not None else {}),
                "health": plane.health.status(),
            }
        )

    @app.get("/v1/rules/current", tags=["rules"], dependencies=admin_only, responses=ADMIN_ERRORS)
    async def current_rule() -> Response:
        return json_response(board().rule.body())

    @app.get("/v1/rules", tags=["rules"], dependencies=admin_only, responses=ADMIN_ERRORS)
    async def rule_history(limit: Annotated[int, Query(ge=1, le=500)] = 20) -> Response:
        return json_response({"rules": await plane.store.history(limit)})

    @app.get("/v1/regions", tags=["rules"], dependencies=admin_only, responses=ADMIN_ERRORS)
    async def regions() -> Response:
        """Which rule version each component of each region has acknowledged, and what the
        lease authority knows of each region's write lease."""
        return json_response(
            {
                "rule_version": board().rule.version,
                "regions": board().status(),
                "leases": plane.leases.status(),
            }
        )

    @app.post(
        "/v1/switch",
        status_code=202,
        tags=["operations"],
        dependencies=admin_only,
        responses=OPERATION_ERRORS,
    )
    async def switch(body: SwitchRequest) -> Response:
        if body.to not in config.region_names:
            raise InvalidRequest(f"unknown region {body.to!r}")
        op = await plane.switch(cell_ids(body.cells), body.to)
        return json_response(op.body(), status=202)

    @app.post(
        "/v1/evacuate",
        status_code=202,
        tags=["operations"],
        dependencies=admin_only,
        responses=OPERATION_ERRORS,
    )
    async def evacuate(body: EvacuateRequest) -> Response:
        for name in (body.region, body.to):
            if name not in config.region_names:
                raise InvalidRequest(f"unknown region {name!r}")
        cells = board().rule.cells_owned_by(body.region)
        if not cells:
            raise SwitchRefused(f"region {body.region} owns no cells")
        op = await plane.switch(cells, body.to, kind="evacuate")
        return json_response(op.body(), status=202)

    @app.post(
        "/v1/failover",
        status_code=202,
        tags=["operations"],
        dependencies=admin_only,
        responses=OPERATION_ERRORS,
    )
    async def failover(body: FailoverRequest) -> Response:
        """Move every cell of a lost region to surviving regions, without its cooperation
        (docs/operations.md, "A dead region"). Refused (409 `failover_refused`, nothing
        changed) unless the health checker and a majority of the other regions agree the
        region is unreachable; `force` overrides that check and is recorded."""
        for name in (body.region, *body.to):
            if name not in config.region_names:
                raise InvalidRequest(f"unknown region {name!r}")
        if len(set(body.to)) != len(body.to):
            raise InvalidRequest("a target region is named twice")
        op = await plane.failover(body.region, list(body.to), body.force)
        return json_response(op.body(), status=202)

    @app.get("/v1/operations", tags=["operations"], dependencies=admin_only, responses=ADMIN_ERRORS)
    async def operations(
        limit: Annotated[int, Query(ge=1, le=OPERATIONS_LIST_MAX)] = 20,
    ) -> Response:
        ops = await plane.store.operations(limit)
        return json_response({"operations": [op.body() for op in ops]})

    @app.get(
        "/v1/operations/{operation_id}",
        tags=["operations"],
        dependencies=admin_only,
        responses=ADMIN_ERRORS,
    )
    async def operation(
        operation_id: Annotated[str, Path(max_length=40)],
        wait_s: Annotated[float, Query(ge=0, le=WAIT_S_MAX)] = 0.0,
    ) -> Response:
        """An operation and its log; with `wait_s`, once it has ended or after that long."""
        op = await plane.wait(operation_id, wait_s) if wait_s else None
        op = op or await plane.store.operation(operation_id)
        if op is None:
            raise NotFound(f"no operation {operation_id}")
        return json_response({**op.body(), "log": await plane.store.log(op.id)})

    @app.post(
        "/v1/operations/{operation_id}/abort",
        status_code=202,
        tags=["operations"],
        dependencies=admin_only,
        responses=OPERATION_ERRORS,
    )
    async def abort(operation_id: Annotated[str, Path(max_length=40)]) -> Response:
        op = await plane.abort(operation_id)
        return json_response(op.body(), status=202)

    # -- flow rules: limits, switches, overload, breakers ----------------------------------

    def flow_body(flow: FlowRules) -> dict[str, object]:
        return {
            "rule_version": board().rule.version,
            "flow": flow.body(),
            "limits": LIMITS,
            "switches": {
                name: {"on": flow.switch_on(name), "turns_off": text}
                for name, text in SWITCHES.items()
            },
        }

    async def changed(change: Callable[[FlowRules, int], FlowRules], reason: str) -> Response:
        rule, missing = await plane.change_flow(change, reason)
        connected = board().connected()
        return json_response(
            {
                **flow_body(rule.flow),
                "acknowledged": sorted(r for r in connected if r not in missing),
                "not_acknowledged": sorted(missing),
            }
        )

    @app.get("/v1/flow", tags=["flow"], dependencies=admin_only, responses=ADMIN_ERRORS)
    async def flow() -> Response:
        """The flow rules in force: every limit, the degradation switches (on or off, and
        what each turns off), overload protection and the circuit breakers."""
        return json_response(flow_body(board().rule.flow))

    @app.put(
        "/v1/flow/limits/{name}",
        tags=["flow"],
        dependencies=admin_only,
        responses=OPERATION_ERRORS,
    )
    async def set_limit(name: Annotated[str, Path(max_length=32)], body: LimitChange) -> Response:
        """Change a rate limit live: a new rule version, pushed to every region and
        acknowledged; the answer names the regions that acknowledged it."""
        if name not in LIMITS:
            raise NotFound(f"no limit {name!r}; the limits are {sorted(LIMITS)}")
        changes = body.model_dump(exclude_unset=True)
        if not changes:
            raise InvalidRequest("nothing to change")
        text = ", ".join(f"{k}={v}" for k, v in changes.items())
        return await changed(
            lambda flow, version: flow.with_limit(name, changes, version),
            f"limit {name}: {text}",
        )

    @app.put(
        "/v1/flow/switches/{name}",
        tags=["flow"],
        dependencies=admin_only,
        responses=OPERATION_ERRORS,
    )
    async def set_switch(name: Annotated[str, Path(max_length=32)], body: SwitchChange) -> Response:
        """Turn a degradation switch on (what it names is turned off) or off."""
        if name not in SWITCHES:
            raise NotFound(f"no switch {name!r}; the switches are {sorted(SWITCHES)}")
        return await changed(
            lambda flow, version: flow.with_switch(name, body.on, version),
            f"switch {name} {'on' if body.on else 'off'}",
        )

    async def set_section(section: str, body: _Body) -> Response:
        changes = body.model_dump(exclude_unset=True)
        if not changes:
            raise InvalidRequest("nothing to change")
        text = ", ".join(f"{k}={v}" for k, v in changes.items())
        return await changed(
            lambda flow, version: flow.with_section(section, changes, version),
            f"{section}: {text}",
        )

    @app.put(
        "/v1/flow/overload", tags=["flow"], dependencies=admin_only, responses=OPERATION_ERRORS
    )
    async def set_overload(body: OverloadChange) -> Response:
        """Change overload protection live."""
        return await set_section("overload", body)

    @app.put(
        "/v1/flow/breakers", tags=["flow"], dependencies=admin_only, responses=OPERATION_ERRORS
    )
    async def set_breakers(body: BreakersChange) -> Response:
        """Change the circuit breakers' settings live."""
        return await set_section("breakers", body)

    async def signed_call(request: Request, model: type[CallT]) -> tuple[str, CallT]:
        """A region's signed call: its name (the signer) and its validated body."""
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        origin = verifier.verify(headers, request.method, request.url.path, body)
        if origin is None or origin not in config.region_names:
            raise Unauthorized("missing or invalid region signature")
        try:
            call = model.model_validate_json(body)
        except ValidationError as exc:
            raise InvalidRequest(f"{request.url.path}: {exc.errors()[0]['msg']}") from exc
        if getattr(call, "region", origin) != origin:
            raise Forbidden("a region calls for itself only")
        return origin, call

    async def watch(request: Request) -> Response:
        origin, call = await signed_call(request, WatchCall)
        rule = await board().watch(origin, call.after, call.acked, call.wait_ms / 1000, call.worker)
        return json_response({"rule": None if rule is None else rule.body()})

    async def lease(request: Request) -> Response:
        origin, call = await signed_call(request, LeaseCall)
        grant = await plane.leases.renew(origin, call.rule_version, call.worker)
        return json_response(grant.body())

    app.router.routes.append(Route("/internal/control/watch", watch, methods=["POST"]))
    app.router.routes.append(Route("/internal/control/lease", lease, methods=["POST"]))

    async def metrics(_request: Request) -> Response:
        lines = [
            "# HELP unitrade_operations_kept Operations in the control store at the last sweep",
            "# TYPE unitrade_operations_kept gauge",
            f"unitrade_operations_kept {plane.operations_kept}",
            "# HELP unitrade_operations_deleted_total Finished operations the sweep deleted",
            "# TYPE unitrade_operations_deleted_total counter",
            f"unitrade_operations_deleted_total {plane.operations_deleted}",
            *plane.health.metrics_lines(),
        ]
        return Response("\n".join(lines) + "\n", media_type=METRICS_CONTENT_TYPE)

    app.add_route("/metrics", metrics, include_in_schema=False)
    return app
