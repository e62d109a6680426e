"""``ctr-starlight optimizer on [--group NAME]`` / ``optimizer off``: record start-up traces."""

from __future__ import annotations

import asyncio

import click

from starlight_cli.config import load_config
from starlight_cli.daemon import control_client
from starlight_cli.errors import reports_errors
from starlight_worker.api import control_pb2 as pb

__all__ = ["optimizer"]


def _switch(socket: str | None, request: pb.OptimizerRequest) -> pb.OptimizerResponse:
    config = load_config(daemon_socket=socket)

    async def run() -> pb.OptimizerResponse:
        async with control_client(config.daemon_socket) as control:
            response: pb.OptimizerResponse = await control.Optimizer(request)
            return response

    return asyncio.run(run())


def _pending(response: pb.OptimizerResponse) -> str:
    count = response.traces_pending
    if not count:
        return ""
    return f"; {count} trace{'s' if count != 1 else ''} to report (ctr-starlight report)"


@click.group()
def optimizer() -> None:
    """Record which files containers read first, so that bundles send them first.

    While the optimizer is on, the daemon records for every container started from starlight
    snapshots the first access to each file, and keeps one trace per container. Upload them
    with: ctr-starlight report
    """


@optimizer.command()
@click.option(
    "--group",
    metavar="NAME",
    help="Containers started together (an app and its database): their images are ranked "
    "jointly, so a bundle of several of them interleaves their start-up files.",
)
@click.option("--socket", help="The daemon's control socket.")
@reports_errors
def on(group: str | None, socket: str | None) -> None:
    """Start recording start-up traces of new containers."""
    response = _switch(socket, pb.OptimizerRequest(enable=True, group=group or ""))
    where = f" (group {response.group})" if response.group else ""
    click.echo(f"optimizer on{where}{_pending(response)}")


@optimizer.command()
@click.option("--socket", help="The daemon's control socket.")
@reports_errors
def off(socket: str | None) -> None:
    """Stop recording; the traces of running containers are finished now."""
    response = _switch(socket, pb.OptimizerRequest(enable=False))
    click.echo(f"optimizer off{_pending(response)}")
