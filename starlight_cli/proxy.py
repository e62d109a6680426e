"""Talking to the Starlight proxy from the CLI (notify, ping, report)."""

from __future__ import annotations

from collections.abc import Sequence

from starlight_cli.config import load_config
from starlight_core.errors import InvalidInput, ProxyUnavailable
from starlight_core.reference import Reference

__all__ = ["notify_proxy", "proxy_client_for"]


def proxy_client_for(proxy: str | None) -> str:
    """The proxy URL to use, or a clear error when none is configured."""
    url = load_config(proxy=proxy).proxy
    if not url:
        raise InvalidInput(
            "proxy not configured",
            hint="pass --proxy URL, set STARLIGHT_PROXY, or set proxy= in /etc/starlight/cli.toml",
        )
    return url


def notify_proxy(proxy: str | None, reference: Reference, *, platforms: Sequence[str] = ()) -> None:
    url = proxy_client_for(proxy)
    raise ProxyUnavailable(f"cannot notify {url} about {reference}: the proxy API is not built yet")
