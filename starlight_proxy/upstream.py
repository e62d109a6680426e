"""Which registries the proxy serves, and how it reaches them.

Image references name a registry as clients see it (``registry.example:5000/app:v1``); the proxy
may reach it at another address (``[[registries]] url``) with its own credentials. ``Upstreams``
checks that a reference's registry is served and gives the registry client and the reference to
fetch it with. The store and the bundle keep the client's name.
"""

from __future__ import annotations

import attrs

from starlight_core.auth import Credentials
from starlight_core.errors import RegistryNotServed
from starlight_core.reference import Reference
from starlight_core.registry import RegistryClient
from starlight_proxy.config import ProxyConfig

__all__ = ["Upstream", "Upstreams"]


@attrs.frozen
class Upstream:
    client: RegistryClient
    reference: Reference
    """The reference as the registry client fetches it (its host may differ)."""


class Upstreams:
    """Registry clients for the configured registries.

    ``client`` replaces them all (tests pass one with their own transport or retry policy);
    the proxy then does not close it.
    """

    def __init__(self, config: ProxyConfig, *, client: RegistryClient | None = None) -> None:
        self._config = config
        self._owned: list[RegistryClient] = []
        self._shared = client
        # TLS verification is a per-client setting in httpx: insecure registries get their own.
        self._clients: dict[bool, RegistryClient] = {}

    def _client(self, insecure: bool) -> RegistryClient:
        if self._shared is not None:
            return self._shared
        client = self._clients.get(insecure)
        if client is None:
            registries = self._config.registries
            client = RegistryClient(
                credentials={
                    r.upstream_host: Credentials(username=r.username, password=r.password)
                    for r in registries
                    if r.username is not None
                },
                plain_http={r.upstream_host for r in registries if r.uses_plain_http},
                insecure=insecure,
                retries=self._config.registry_retries,
                timeout=self._config.registry_timeout,
            )
            self._clients[insecure] = client
            self._owned.append(client)
        return client

    def resolve(self, reference: Reference) -> Upstream:
        """Where to fetch ``reference``; ``RegistryNotServed`` if its registry is not served."""
        registry = self._config.registry_for(reference.domain)
        if registry is None:
            if self._config.allow_any_registry:
                return Upstream(self._client(False), reference)
            served = ", ".join(r.host for r in self._config.registries) or "none configured"
            raise RegistryNotServed(
                f"this proxy does not serve images of {reference.domain} (served: {served})"
            )
        upstream = reference
        if registry.url is not None:
            upstream = attrs.evolve(reference, domain=registry.upstream_host)
        return Upstream(self._client(registry.insecure), upstream)

    def check(self, reference: Reference) -> None:
        """Refuse a reference whose registry is not served (nothing is fetched)."""
        self.resolve(reference)

    async def aclose(self) -> None:
        for client in self._owned:
            await client.aclose()
        self._owned.clear()
        self._clients.clear()
