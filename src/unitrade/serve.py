"""Run one region's HTTP server in this process (what `unitrade up` starts per region).

A region of many processes (`workers` > 1) runs one such process per worker, each binding
the region's one `listen` address with SO_REUSEPORT: the kernel spreads the incoming
connections over them, so clients, other regions and the control plane see one address.
Why not uvicorn's or gunicorn's workers: each process must know its number (its rule
agent, lease and status name it, docs/architecture.md), and each is a process of its own
that `unitrade up`, `unitrade serve` or systemd starts and supervises like any other
(`unitrade stop --region hz.1` is a drill on one). Why not one port per worker behind a
proxy: a proxy's hop costs CPU on every request, and CPU is what more workers are for.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from types import FrameType

import uvicorn

from unitrade import planted
from unitrade.gateway.app import build_app
from unitrade.region import RegionRuntime
from unitrade.topology.config import TopologyConfig, check_production

BACKLOG = 2048


def serve_region(config: TopologyConfig, region: str, data_dir: Path, worker: int = 0) -> None:
    region_config = config.region(region)
    name = region if region_config.workers == 1 else f"{region}.{worker}"
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
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
    runtime = RegionRuntime(config, region, data_dir, worker=worker)
    server = RegionServer(
        runtime,
        uvicorn.Config(
            build_app(runtime),
            host=region_config.host,
            port=region_config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=10,
            limit_concurrency=2000,
            backlog=BACKLOG,
            **region_config.uvicorn_tls(),  # type: ignore[arg-type]
        ),
    )
    if region_config.workers == 1:
        server.run()
        return
    sock = shared_socket(region_config.host, region_config.port)
    server.run(sockets=[sock])


class RegionServer(uvicorn.Server):
    """uvicorn's server, which tells the region's replication streams that it stops: the
    graceful shutdown waits for every open request, and a stream lasts up to 5 s
    (replication/stream.py) where it otherwise ends within a heartbeat."""

    def __init__(self, runtime: RegionRuntime, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A flag, not an event: this runs in a signal handler, between any two bytecodes.
        self.runtime.replicator.stopping = True
        super().handle_exit(sig, frame)


def shared_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port that the other processes of the region bind too
    (SO_REUSEPORT: the kernel hands each new connection to one of them)."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.set_inheritable(False)
    except BaseException:
        sock.close()
        raise
    return sock
