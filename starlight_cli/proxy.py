"""Talking to the Starlight proxy from the CLI (notify, ping, convert --notify).

Where the proxy is and how to log in come from the flags, else ``STARLIGHT_PROXY`` /
``STARLIGHT_PROXY_USER``, else ``cli.toml`` (see ``starlight_cli.config``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import attrs

from starlight_cli.config import load_config
from starlight_core.errors import InvalidInput
from starlight_core.platform import Platform
from starlight_core.proxy_client import NotifyResult, ProxyClient
from starlight_core.reference import Reference

__all__ = ["ProxySettings", "notify_proxy", "proxy_client_for"]


@attrs.frozen
class ProxySettings:
    url: str
    user: str | None = attrs.field(default=None, repr=False)

    def client(self) -> ProxyClient:
        return ProxyClient(self.url, user=self.user)


def proxy_client_for(proxy: str | None, proxy_user: str | None = None) -> ProxySettings:
    """The proxy to talk to, or a clear error when none is configured (checked before any
    work, so that ``convert --notify`` fails early)."""
    config = load_config(proxy=proxy, proxy_user=proxy_user)
    if not config.proxy:
        raise InvalidInput(
            "proxy not configured",
            hint="pass --proxy URL, set STARLIGHT_PROXY, or set proxy= in /etc/starlight/cli.toml",
        )
    if not config.proxy.startswith(("http://", "https://")):
        raise InvalidInput(f"proxy URL {config.proxy!r} must start with http:// or https://")
    if config.proxy_user is not None and ":" not in config.proxy_user:
        raise InvalidInput("proxy credentials must be given as USER:PASSWORD")
    return ProxySettings(config.proxy, config.proxy_user)


def notify_proxy(
    proxy: str | None,
    reference: Reference,
    *,
    platforms: Sequence[str | Platform] = (),
    all_platforms: bool = False,
    proxy_user: str | None = None,
) -> list[NotifyResult]:
    """Have the proxy index ``reference``: once per platform given, or once (its default)."""
    settings = proxy_client_for(proxy, proxy_user)

    async def run() -> list[NotifyResult]:
        async with settings.client() as client:
            if all_platforms or not platforms:
                return [await client.notify(reference, all_platforms=all_platforms)]
            return [await client.notify(reference, platform=p) for p in platforms]

    return asyncio.run(run())
