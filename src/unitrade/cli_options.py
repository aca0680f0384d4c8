"""What every `unitrade` command shares: the `--config` option, loading it, the hints for a
config that is not the cluster's, and masking passwords in the URLs the CLI prints."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich import box
from rich.table import Table

from unitrade.topology.config import ConfigError, TopologyConfig, load_config

if TYPE_CHECKING:
    from unitrade.cluster import LocalCluster

CONFIG_ENVVAR = "UNITRADE_CONFIG"
DATA_ENVVAR = "UNITRADE_DATA"
DATA_DIR_DEFAULT = Path(".unitrade/data")
CONFIG_HINT = (
    f"is {CONFIG_ENVVAR} / --config the file the cluster was started with? "
    "(its addresses and secret must be the cluster's)"
)

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    envvar=CONFIG_ENVVAR,
    show_envvar=True,
    help="Topology TOML file the cluster runs with (default: the built-in hz/sh/bj with "
    "the control plane on 127.0.0.1:8700 and the regions on 8701-8703).",
)

# user:password@ in a URL; the password stops at the first '@' or '/' (both must be
# percent-encoded in a password anyway).
_PASSWORD = re.compile(r"(://[^/@:]*:)[^@/]*@")


class ConfigProblem(click.ClickException):
    """The configuration cannot be used: bad input, exit status 2 like a usage error."""

    exit_code = 2


def load(config_path: Path | None) -> TopologyConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise ConfigProblem(str(exc)) from exc


def mask_password(url: str) -> str:
    """The URL with its password, if any, replaced by ***: safe to print or log."""
    return _PASSWORD.sub(r"\1***@", url)


def not_the_cluster(message: str) -> click.ClickException:
    """An error for a call the cluster refused (401) or that reached nothing, with the hint
    that the configuration may not be the cluster's."""
    return click.ClickException(f"{message}\nhint: {CONFIG_HINT}")


class PortsInUse(click.ClickException):
    """Something already listens where the cluster would: exit status 2, nothing started."""

    exit_code = 2


def refuse_ports_in_use(cluster: LocalCluster) -> None:
    busy = cluster.ports_in_use()
    if busy:
        raise PortsInUse(
            f"in use: {', '.join(busy)}.\nIs `unitrade up` (or `unitrade demo`) already "
            f"running? Stop it, or pass --config (or set {CONFIG_ENVVAR}) with a topology "
            "on other ports. Nothing was started."
        )


def compact_table(title: str, caption: str | None = None) -> Table:
    """A table with no vertical rules and two spaces between columns: fits 80 columns."""
    return Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        caption_justify="left",
    )
