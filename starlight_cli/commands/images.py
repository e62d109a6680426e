"""``ctr-starlight images``: what the worker holds, and how much of each image is local."""

from __future__ import annotations

import asyncio
import datetime
import json

import click
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from starlight_cli.config import load_config
from starlight_cli.daemon import control_client
from starlight_cli.errors import reports_errors
from starlight_worker.api import control_pb2 as pb

__all__ = ["images"]


@click.command()
@click.option("--socket", help="The daemon's control socket.")
@click.option("--quiet", "-q", is_flag=True, help="Only print references.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
@reports_errors
def images(socket: str | None, quiet: bool, as_json: bool) -> None:
    """List the images pulled through starlight."""
    config = load_config(daemon_socket=socket)

    async def run() -> pb.ImagesResponse:
        async with control_client(config.daemon_socket) as control:
            response: pb.ImagesResponse = await control.Images(pb.ImagesRequest())
            return response

    response = asyncio.run(run())
    if as_json:
        rows = [MessageToDict(image, preserving_proto_field_name=True) for image in response.images]
        click.echo(json.dumps(rows, indent=2))
        return
    if quiet:
        for image in response.images:
            click.echo(image.reference)
        return
    table = Table(box=None)
    for column in ("REFERENCE", "DIGEST", "PLATFORM", "LOCAL", "FILES", "PULLED"):
        table.add_column(column)
    for image in response.images:
        share = image.bytes_local / image.bytes_total if image.bytes_total else 1.0
        pulled = datetime.datetime.fromtimestamp(image.pulled_at).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            image.reference,
            image.manifest_digest[7:19],
            image.platform,
            f"{share:.0%}" + ("" if image.complete else " (pulling)"),
            f"{image.files_local}/{image.files_total}",
            pulled,
        )
    Console().print(table)
