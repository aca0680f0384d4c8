"""Run the control plane's HTTP server in this process (what `unitrade up` starts)."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from unitrade.control.app import build_control_app
from unitrade.control.plane import ControlPlane
from unitrade.control.store import ControlStore
from unitrade.topology.config import TopologyConfig, check_production


def serve_control(config: TopologyConfig, data_dir: Path) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s control %(levelname)s %(name)s: %(message)s",
    )
    warning = check_production(config)
    if warning is not None:
        logging.getLogger("unitrade.control").warning(warning)
    store = ControlStore(config.control.storage_url(data_dir))
    app = build_control_app(config, ControlPlane(config, store))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.control.host,
            port=config.control.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,  # open requests are watches; cutting them is harmless
            limit_concurrency=500,
            **config.control.uvicorn_tls(),  # type: ignore[arg-type]
        )
    )
    server.run()
