"""``ctr-starlight``: the command line of starlight."""

from __future__ import annotations

import logging

import click

from starlight_cli import __version__
from starlight_cli.commands.convert import convert
from starlight_cli.commands.images import images
from starlight_cli.commands.notify import notify
from starlight_cli.commands.optimizer import optimizer
from starlight_cli.commands.ping import ping
from starlight_cli.commands.pull import pull
from starlight_cli.commands.report import report
from starlight_cli.commands.reset import reset
from starlight_cli.commands.status import status

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log debug messages to stderr.")
@click.version_option(__version__, prog_name="ctr-starlight")
def cli(debug: bool) -> None:
    """Fast container provisioning: convert images, feed the proxy, pull through the daemon."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING)


cli.add_command(convert)
cli.add_command(pull)
cli.add_command(reset)
cli.add_command(status)
cli.add_command(images)
cli.add_command(notify)
cli.add_command(ping)
cli.add_command(optimizer)
cli.add_command(report)


@cli.command()
def version() -> None:
    """Print the version."""
    click.echo(f"ctr-starlight {__version__}")


def main() -> None:
    cli(prog_name="ctr-starlight")
