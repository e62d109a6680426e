"""``ctr-starlight convert SRC DST``: re-encode an image in Starlight format, registry to
registry."""

from __future__ import annotations

import asyncio

import click

from starlight_cli.errors import reports_errors
from starlight_cli.options import PLATFORM, REFERENCE, SIZE, parse_credentials, registry_options
from starlight_cli.progress import ByteProgress
from starlight_core.layer.toc import DEFAULT_CHUNK_SIZE
from starlight_core.platform import Platform
from starlight_core.reference import Reference

__all__ = ["convert"]


@click.command()
@click.argument("source", type=REFERENCE)
@click.argument("destination", type=REFERENCE)
@click.option(
    "--platform",
    "platforms",
    type=PLATFORM,
    multiple=True,
    help="Platform to convert from a multi-platform image (repeatable; default: host).",
)
@click.option("--all-platforms", is_flag=True, help="Convert every platform of the image.")
@click.option("--insecure-source", is_flag=True, help="Plain HTTP to the source registry.")
@click.option(
    "--insecure-destination", is_flag=True, help="Plain HTTP to the destination registry."
)
@registry_options
@click.option("--src-user", metavar="USER:PASSWORD", help="Credentials for the source registry.")
@click.option(
    "--dst-user", metavar="USER:PASSWORD", help="Credentials for the destination registry."
)
@click.option(
    "--chunk-size",
    type=SIZE,
    default=DEFAULT_CHUNK_SIZE,
    show_default=True,
    help="Large files are split into independently fetchable chunks of this size.",
)
@click.option(
    "--jobs",
    "-j",
    type=click.IntRange(1, 32),
    default=3,
    show_default=True,
    help="Layers converted at once.",
)
@click.option("--notify", is_flag=True, help="Tell the proxy about the converted image.")
@click.option("--proxy", metavar="URL", help="The proxy for --notify (default: config).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@reports_errors
def convert(
    source: Reference,
    destination: Reference,
    platforms: tuple[Platform, ...],
    all_platforms: bool,
    insecure_source: bool,
    insecure_destination: bool,
    plain_http: bool,
    insecure: bool,
    src_user: str | None,
    dst_user: str | None,
    chunk_size: int,
    jobs: int,
    notify: bool,
    proxy: str | None,
    quiet: bool,
) -> None:
    """Convert SOURCE into Starlight format and push it as DESTINATION.

    Layers stay standard gzip tar layers (any runtime can pull and run the result); each file
    becomes independently addressable. The image config is unchanged.
    """
    from starlight_core.auth import CredentialStore
    from starlight_core.convert import (
        ConvertOptions,
        ConvertResult,
        LayerProgress,
        convert_image,
    )
    from starlight_core.registry import RegistryClient

    if all_platforms and platforms:
        raise click.UsageError("--platform and --all-platforms are exclusive")
    if notify:
        # Resolve the proxy before any work: a missing proxy is a usage problem, found early.
        from starlight_cli.proxy import proxy_client_for

        proxy_client_for(proxy)
    explicit = {}
    if src_user:
        explicit[source.domain] = parse_credentials(src_user) or ""
    if dst_user:
        explicit[destination.domain] = parse_credentials(dst_user) or ""
    plain: bool | set[str] = plain_http or {
        ref.domain
        for ref, flag in ((source, insecure_source), (destination, insecure_destination))
        if flag
    }
    options = ConvertOptions(
        platforms=platforms, all_platforms=all_platforms, chunk_size=chunk_size, jobs=jobs
    )

    with ByteProgress(quiet=quiet) as bars:

        def on_progress(event: LayerProgress) -> None:
            label = f"{event.platform} layer {event.index} {event.digest.hex[:12]} {event.state}"
            bars.update(f"{event.platform}/{event.index}", label, event.done, event.total or None)

        async def run() -> ConvertResult:
            credentials = CredentialStore.from_docker_config(explicit=explicit)
            async with RegistryClient(
                credentials=credentials, plain_http=plain, insecure=insecure
            ) as client:
                return await convert_image(client, source, destination, options, on_progress)

        result = asyncio.run(run())

    for image in result.images:
        reused = sum(1 for layer in image.layers if layer.reused)
        click.echo(
            f"{image.platform}: {len(image.layers)} layers "
            f"({len(image.layers) - reused} converted, {reused} reused), "
            f"manifest {image.manifest.digest}",
            err=True,
        )
    click.echo(str(result.reference))
    if notify:
        from starlight_cli.proxy import notify_proxy

        notify_proxy(proxy, destination, platforms=[i.platform for i in result.images])
