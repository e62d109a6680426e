"""``ctr-starlight status``: is the daemon up, which proxy, what it holds."""

from __future__ import annotations

import asyncio

import click

from starlight_cli.config import load_config
from starlight_cli.daemon import control_client
from starlight_cli.errors import reports_errors
from starlight_worker.api import control_pb2 as pb

__all__ = ["status"]


@click.command()
@click.option("--socket", help="The daemon's control socket.")
@reports_errors
def status(socket: str | None) -> None:
    """Show the daemon's version, proxy, store and what FUSE still serves."""
    config = load_config(daemon_socket=socket)

    async def run() -> pb.StatusResponse:
        async with control_client(config.daemon_socket) as control:
            response: pb.StatusResponse = await control.Status(pb.StatusRequest())
            return response

    response = asyncio.run(run())
    click.echo(f"daemon     starlight-daemon {response.version}")
    click.echo(f"proxy      {response.proxy}")
    click.echo(f"store      {response.root}")
    click.echo(f"layers     {response.layers_complete}/{response.layers} complete")
    click.echo(f"pulls      {response.pulls_active} active")
    fuse = ", ".join(layer[:19] for layer in response.fuse_layers) or "none"
    click.echo(f"FUSE       {fuse}")
