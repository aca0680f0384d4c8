"""What every `unitrade` command shares: the `--config` option and loading it."""

from __future__ import annotations

from pathlib import Path

import click

from unitrade.topology.config import ConfigError, TopologyConfig, load_config

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Topology TOML file (default: built-in hz/sh/bj on 127.0.0.1:8700-8703).",
)


def load(config_path: Path | None) -> TopologyConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from exc
