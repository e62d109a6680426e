"""``ctr-starlight notify REF``: have the proxy index a converted image."""

from __future__ import annotations

import click

from starlight_cli.errors import reports_errors
from starlight_cli.options import PLATFORM, REFERENCE
from starlight_core.platform import Platform
from starlight_core.reference import Reference

__all__ = ["notify"]


@click.command()
@click.argument("reference", metavar="REF", type=REFERENCE)
@click.option(
    "--platform",
    "platforms",
    type=PLATFORM,
    multiple=True,
    help="Platform to index from a multi-platform image (repeatable; default: the proxy's).",
)
@click.option("--all-platforms", is_flag=True, help="Index every platform of the image.")
@click.option("--proxy", metavar="URL", help="The proxy (default: STARLIGHT_PROXY or cli.toml).")
@click.option(
    "--proxy-user",
    metavar="USER:PASSWORD",
    help="Credentials for the proxy (default: STARLIGHT_PROXY_USER or cli.toml).",
)
@reports_errors
def notify(
    reference: Reference,
    platforms: tuple[Platform, ...],
    all_platforms: bool,
    proxy: str | None,
    proxy_user: str | None,
) -> None:
    """Tell the proxy about REF, an image converted with `ctr-starlight convert`.

    The proxy reads each new layer once and stores its file list; workers can then pull
    REF through it. Notifying again is harmless.
    """
    from starlight_cli.proxy import notify_proxy

    if all_platforms and platforms:
        raise click.UsageError("--platform and --all-platforms are exclusive")
    results = notify_proxy(
        proxy, reference, platforms=platforms, all_platforms=all_platforms, proxy_user=proxy_user
    )
    for result in results:
        for image in result.images:
            click.echo(f"{image.name}@{image.digest} {image.platform} {image.state}")
        click.echo(
            f"{result.layers_scanned} layers indexed, {result.layers_known} already known, "
            f"in {result.seconds:.2f}s",
            err=True,
        )
