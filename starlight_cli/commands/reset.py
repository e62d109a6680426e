"""``ctr-starlight reset``: remove what starlight created, and nothing else."""

from __future__ import annotations

import asyncio

import click

from starlight_cli.config import load_config
from starlight_cli.daemon import control_client
from starlight_cli.errors import reports_errors
from starlight_worker.api import control_pb2 as pb

__all__ = ["reset"]


@click.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@click.option("--socket", help="The daemon's control socket.")
@reports_errors
def reset(dry_run: bool, socket: str | None) -> None:
    """Remove containers on the starlight snapshotter (killing their tasks), the images
    starlight pulled, its snapshots, FUSE mounts and local store. Other images, containers and
    snapshots of containerd are left alone."""
    config = load_config(daemon_socket=socket)

    async def run() -> pb.ResetResponse:
        async with control_client(config.daemon_socket) as control:
            response: pb.ResetResponse = await control.Reset(pb.ResetRequest(dry_run=dry_run))
            return response

    response = asyncio.run(run())
    for item in response.removed:
        click.echo(("would remove " if dry_run else "removed ") + item)
