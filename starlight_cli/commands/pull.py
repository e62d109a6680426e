"""``ctr-starlight pull REF``: provision an image through the proxy into containerd."""

from __future__ import annotations

import asyncio

import click

from starlight_cli.config import load_config
from starlight_cli.daemon import control_client
from starlight_cli.errors import reports_errors
from starlight_cli.options import PLATFORM, REFERENCE
from starlight_cli.progress import ByteProgress
from starlight_core.platform import Platform
from starlight_core.reference import Reference
from starlight_worker.api import control_pb2 as pb

__all__ = ["pull"]


@click.command()
@click.argument("reference", type=REFERENCE)
@click.option("--platform", type=PLATFORM, help="os/arch[/variant] (default: the host's)")
@click.option("--namespace", "-n", help="containerd namespace (default: the daemon's)")
@click.option(
    "--wait",
    is_flag=True,
    help="Return when every content is local, not as soon as containers can start.",
)
@click.option(
    "--no-ordering",
    is_flag=True,
    help="Ask for layer order instead of start-up order (for measurements).",
)
@click.option(
    "--from",
    "from_refs",
    type=REFERENCE,
    multiple=True,
    help="Compute the delta from these images (default: what the worker holds).",
)
@click.option("--cold", is_flag=True, help="Ignore what the worker holds: fetch everything.")
@click.option("--socket", help="The daemon's control socket (default /run/starlight/daemon.sock).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@reports_errors
def pull(
    reference: Reference,
    platform: Platform | None,
    namespace: str | None,
    wait: bool,
    no_ordering: bool,
    from_refs: tuple[Reference, ...],
    cold: bool,
    socket: str | None,
    quiet: bool,
) -> None:
    """Pull REFERENCE through the starlight daemon.

    Returns as soon as the image and its snapshots exist in containerd (``ctr run --snapshotter
    starlight REFERENCE …`` works then); contents keep streaming in the daemon. With --wait,
    returns when the image is complete.
    """
    config = load_config(daemon_socket=socket)
    request = pb.PullRequest(
        reference=str(reference),
        platform=str(platform) if platform else "",
        namespace=namespace or "",
        wait=wait,
        no_ordering=no_ordering,
        no_from=cold,
        **{"from": [str(r) for r in from_refs]},
    )

    async def run() -> pb.PullProgress | None:
        last = None
        with ByteProgress(quiet=quiet) as bars:
            async with (
                control_client(config.daemon_socket) as control,
                control.Pull.open() as stream,
            ):
                await stream.send_message(request, end=True)
                async for progress in stream:
                    last = progress
                    phase = pb.PullProgress.Phase.Name(progress.phase).lower()
                    bars.update(
                        "pull",
                        f"{reference.familiar()} {phase} "
                        f"{progress.files_done}/{progress.files_total} files",
                        progress.bytes_received,
                        progress.bytes_expected or None,
                    )
        return last

    last = asyncio.run(run())
    if last is None:
        return
    state = "complete" if last.phase == pb.PullProgress.COMPLETE else "ready"
    click.echo(
        f"{reference} {state} in {last.elapsed_seconds:.2f}s "
        f"({last.bytes_received} bytes received, {last.files_done}/{last.files_total} files local, "
        f"{last.contents_local} copied locally)"
    )
