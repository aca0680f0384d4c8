"""Run the control plane's HTTP server in this process (what `unitrade up` starts)."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from unitrade.control.app import build_control_app
from unitrade.control.election import Election, etcd_control_plane
from unitrade.control.plane import ControlPlane
from unitrade.control.store import SqlControlStore
from unitrade.topology.config import TopologyConfig, check_production
from unitrade.web.coalesce import CoalescingHttpProtocol


def serve_control(config: TopologyConfig, data_dir: Path, member: str | None = None) -> None:
    """Serve the control plane, or with several members (on etcd) the member `member`."""
    control = config.control
    me = control.member(member) if member is not None else control.member_list[0]
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s control {me.name} %(levelname)s %(name)s: %(message)s",
    )
    warning = check_production(config)
    if warning is not None:
        logging.getLogger("unitrade.control").warning(warning)
    election: Election | None = None
    if control.etcd:
        plane, election = etcd_control_plane(config, me.name)
    else:
        plane = ControlPlane(config, SqlControlStore(control.storage_url(data_dir)))
    app = build_control_app(config, plane, election)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=me.host,
            port=me.port,
            http=CoalescingHttpProtocol,
            # The client address stays the connection's peer: which proxies to believe is
            # unitrade's own setting ([flow] trusted_proxies), not uvicorn's default of
            # believing X-Forwarded-For from 127.0.0.1.
            proxy_headers=False,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,  # open requests are watches; cutting them is harmless
            limit_concurrency=500,
            **me.uvicorn_tls(),  # type: ignore[arg-type]
        )
    )
    server.run()
