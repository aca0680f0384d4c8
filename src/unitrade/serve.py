"""Run one region's HTTP server in this process (what `unitrade up` starts per region)."""

from __future__ import annotations

import logging
from pathlib import Path

import uvicorn

from unitrade import planted
from unitrade.gateway.app import build_app
from unitrade.region import RegionRuntime
from unitrade.topology.config import TopologyConfig, check_production


def serve_region(config: TopologyConfig, region: str, data_dir: Path) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {region} %(levelname)s %(name)s: %(message)s",
    )
    warning = check_production(config)
    log = logging.getLogger("unitrade.region")
    if warning is not None:
        log.warning(warning)
    bug = planted.announcement()
    if bug is not None:
        if config.secrets.production and planted.PLANTED in planted.KNOWN:
            raise SystemExit(f"refusing to start in production: {bug}")
        log.warning(bug)
    region_config = config.region(region)
    runtime = RegionRuntime(config, region, data_dir)
    server = uvicorn.Server(
        uvicorn.Config(
            build_app(runtime),
            host=region_config.host,
            port=region_config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
            limit_concurrency=2000,
            backlog=2048,
            **region_config.uvicorn_tls(),  # type: ignore[arg-type]
        )
    )
    server.run()
