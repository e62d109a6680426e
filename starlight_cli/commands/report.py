"""``ctr-starlight report``: upload the recorded start-up traces to the proxy."""

from __future__ import annotations

import asyncio

import click

from starlight_cli.config import load_config
from starlight_cli.daemon import control_client
from starlight_cli.errors import EXIT_ERROR, reports_errors
from starlight_worker.api import control_pb2 as pb

__all__ = ["report"]


@click.command()
@click.option(
    "--proxy",
    metavar="URL",
    help="Upload to this proxy (default: the daemon's; its credentials go to it only).",
)
@click.option("--socket", help="The daemon's control socket.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing unless a trace is refused.")
@reports_errors
def report(proxy: str | None, socket: str | None, quiet: bool) -> None:
    """Upload the finished start-up traces (the daemon sends each once; repeating is safe).

    The proxy merges them into the start-up order of their images: later bundles of those
    images send first the files their containers read first.
    """
    config = load_config(daemon_socket=socket)

    async def run() -> pb.ReportResponse:
        async with control_client(config.daemon_socket) as control:
            response: pb.ReportResponse = await control.Report(pb.ReportRequest(proxy=proxy or ""))
            return response

    response = asyncio.run(run())
    for reason in response.rejected:
        click.echo(f"ctr-starlight: {reason}", err=True)
    if not quiet:
        line = f"{response.traces_sent} traces sent"
        if response.traces_already_sent:
            line += f", {response.traces_already_sent} the proxy had already"
        if response.traces_pending:
            line += f", {response.traces_pending} still pending"
        click.echo(line)
        for image in response.images:
            click.echo(f"  start-up order updated: {image}")
    if response.rejected:
        raise SystemExit(EXIT_ERROR)
