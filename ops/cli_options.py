"""What every `hotq` subcommand shares: the --config option and loading the config it names."""

from __future__ import annotations

import click

from broker.config import Config, load_config
from broker.errors import ConfigError


def load(config_path: str | None) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(exc.message) from None


config_option = click.option(
    "--config", "config_path", envvar="HOTQ_CONFIG", default=None, help="TOML config file [default: ./hotq.toml]"
)
