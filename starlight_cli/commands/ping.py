"""``ctr-starlight ping``: is the proxy there, and how far away."""

from __future__ import annotations

import asyncio

import click

from starlight_cli.errors import reports_errors

__all__ = ["ping"]


@click.command()
@click.option("--proxy", metavar="URL", help="The proxy (default: STARLIGHT_PROXY or cli.toml).")
@click.option(
    "--proxy-user",
    metavar="USER:PASSWORD",
    help="Credentials for the proxy (default: STARLIGHT_PROXY_USER or cli.toml).",
)
@click.option(
    "--count",
    "-c",
    type=click.IntRange(1, 10_000),
    default=4,
    show_default=True,
    help="Requests to send.",
)
@reports_errors
def ping(proxy: str | None, proxy_user: str | None, count: int) -> None:
    """Measure the round-trip time to the proxy (its health check) COUNT times."""
    from starlight_cli.proxy import proxy_client_for

    settings = proxy_client_for(proxy, proxy_user)

    async def run() -> tuple[str, list[float]]:
        async with settings.client() as client:
            health = await client.health()  # the first answer opens the connection
            click.echo(
                f"proxy {settings.url}: starlight-proxy {health.version}, {health.database} "
                "metadata store"
            )
            times = []
            for sequence in range(1, count + 1):
                seconds = await client.ping()
                times.append(seconds)
                click.echo(f"seq={sequence} time={seconds * 1000:.3f} ms")
            return health.version, times

    _, times = asyncio.run(run())
    click.echo(
        f"rtt min/avg/max = {min(times) * 1000:.3f}/{sum(times) / len(times) * 1000:.3f}/"
        f"{max(times) * 1000:.3f} ms ({count} requests)"
    )
