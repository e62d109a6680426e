"""The proxy's configuration: one TOML file, overridden by ``STARLIGHT_PROXY_*`` variables, then
by command-line flags.

The file is ``/etc/starlight/proxy.toml`` unless ``--config`` or ``STARLIGHT_PROXY_CONFIG`` names
another; a missing default file means "all defaults", a missing named file is an error. Example::

    listen = "127.0.0.1"        # 0.0.0.0 in a DaemonSet or behind a load balancer
    port = 8090
    database = "/var/lib/starlight-proxy/metadata.db"   # or "postgresql://user@db/starlight"
    allow_any_registry = false  # refuse references naming a registry not listed below
    auto_notify = false         # a delta for an image never notified indexes it first

    [[registries]]
    host = "registry.example:5000"       # as it appears in image references
    url = "http://registry.internal:5000"  # how the proxy reaches it (default: from host)
    plain_http = false
    insecure = false                     # skip TLS verification
    username = "starlight"               # the proxy's own credentials for it
    password = "..."

    [auth]                               # absent: no client authentication
    tokens = ["a-long-random-token"]     # Authorization: Bearer <token>
    [[auth.users]]                       # Authorization: Basic (user:password)
    name = "worker"
    password_sha256 = "<hex sha256 of the password>"   # or password = "plain text"

The defaults run on one box: listen on loopback only (nothing is exposed until the operator
says so), SQLite under ``/var/lib/starlight-proxy``. Scalar settings (not the lists) can be set
from the environment: ``STARLIGHT_PROXY_PORT=9000``, ``STARLIGHT_PROXY_DATABASE=...``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import attrs

from starlight_core import wire
from starlight_core.errors import InvalidInput, InvalidReference
from starlight_core.reference import Reference

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_DATABASE",
    "DEFAULT_LISTEN",
    "DEFAULT_PORT",
    "AuthConfig",
    "BasicUser",
    "ProxyConfig",
    "UpstreamRegistry",
    "load_config",
]

DEFAULT_CONFIG_PATH: Final = Path("/etc/starlight/proxy.toml")
DEFAULT_LISTEN: Final = "127.0.0.1"
DEFAULT_PORT: Final = 8090
DEFAULT_DATABASE: Final = "/var/lib/starlight-proxy/metadata.db"
ENV_PREFIX: Final = "STARLIGHT_PROXY_"
_DOCKER_HUB_HOSTS: Final = frozenset({"index.docker.io", "registry-1.docker.io"})
_LOG_LEVELS: Final = frozenset({"debug", "info", "warning", "error", "critical"})
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off", ""})


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise InvalidInput(f"{attribute.name} must be positive, not {value}")


def _not_negative(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise InvalidInput(f"{attribute.name} must not be negative, not {value}")


@attrs.frozen
class UpstreamRegistry:
    """A registry whose images the proxy serves."""

    host: str
    """The registry part of image references (``127.0.0.1:5000``, ``docker.io``)."""
    url: str | None = None
    """How the proxy reaches it (``http://registry:5000``); default ``https://{host}``
    (``http://`` with ``plain_http``)."""
    plain_http: bool = False
    insecure: bool = False
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        try:
            parsed = Reference.parse(f"{self.host}/x")
        except InvalidReference as exc:
            raise InvalidInput(f"registry host {self.host!r} is not a registry name") from exc
        if parsed.domain != self.host and self.host not in _DOCKER_HUB_HOSTS:
            raise InvalidInput(
                f"registry host {self.host!r} must be a registry name such as "
                "registry.example:5000 (with a dot, a port, or localhost)"
            )
        if self.url is not None:
            split = urlsplit(self.url)
            if split.scheme not in ("http", "https") or not split.netloc:
                raise InvalidInput(f"registry url {self.url!r} must be http://host[:port]")
            if split.path.strip("/") or split.query or split.fragment:
                raise InvalidInput(f"registry url {self.url!r} must not have a path")
        if (self.username is None) != (self.password is None):
            raise InvalidInput(f"registry {self.host}: give both username and password, or none")

    @property
    def domain(self) -> str:
        """``host`` as references normalise it (``index.docker.io`` is ``docker.io``)."""
        return Reference.parse(f"{self.host}/x").domain

    @property
    def upstream_host(self) -> str:
        """``host:port`` the proxy connects to."""
        if self.url is not None:
            return urlsplit(self.url).netloc
        return Reference.parse(f"{self.host}/x").registry_host

    @property
    def uses_plain_http(self) -> bool:
        if self.url is not None:
            return urlsplit(self.url).scheme == "http"
        return self.plain_http


@attrs.frozen
class BasicUser:
    """A client allowed in with HTTP Basic authentication."""

    name: str
    password: str | None = attrs.field(default=None, repr=False)
    password_sha256: str | None = attrs.field(default=None, repr=False)
    """Hex sha256 of the password, so the config file need not hold it in clear."""

    def __attrs_post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise InvalidInput(f"auth user name {self.name!r} must be non-empty without ':'")
        if (self.password is None) == (self.password_sha256 is None):
            raise InvalidInput(
                f"auth user {self.name}: give exactly one of password and password_sha256"
            )
        if self.password_sha256 is not None and (
            len(self.password_sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.password_sha256.lower())
        ):
            raise InvalidInput(f"auth user {self.name}: password_sha256 must be 64 hex digits")

    def accepts(self, password: str) -> bool:
        if self.password is not None:
            return hmac.compare_digest(self.password.encode(), password.encode())
        assert self.password_sha256 is not None
        actual = hashlib.sha256(password.encode()).hexdigest()
        return hmac.compare_digest(actual, self.password_sha256.lower())


@attrs.frozen
class AuthConfig:
    """Who may use ``/starlight/*`` and ``/metrics``; empty: everyone."""

    users: tuple[BasicUser, ...] = ()
    tokens: tuple[str, ...] = attrs.field(default=(), repr=False)
    realm: str = "starlight-proxy"

    def __attrs_post_init__(self) -> None:
        if any(not token for token in self.tokens):
            raise InvalidInput("auth tokens must not be empty")
        names = [user.name for user in self.users]
        if len(set(names)) != len(names):
            raise InvalidInput("auth users must have distinct names")
        if '"' in self.realm or "\\" in self.realm:
            raise InvalidInput("auth realm must not contain quotes or backslashes")

    @property
    def enabled(self) -> bool:
        return bool(self.users or self.tokens)


@attrs.frozen(kw_only=True)
class ProxyConfig:
    listen: str = DEFAULT_LISTEN
    port: int = attrs.field(default=DEFAULT_PORT)
    database: str = DEFAULT_DATABASE
    """A SQLite file path, or a ``postgresql://`` URL shared by several proxies."""
    registries: tuple[UpstreamRegistry, ...] = ()
    allow_any_registry: bool = False
    """Serve references to registries not listed (anonymously, over HTTPS)."""
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    auto_notify: bool = False
    """A delta whose target was never notified indexes it first instead of answering 404."""
    log_level: str = "info"
    ranges_in_flight: int = attrs.field(default=4, validator=_positive)
    """Registry Range reads a bundle keeps in flight."""
    buffer_bytes: int = attrs.field(default=48 * 1024 * 1024, validator=_positive)
    """Registry bytes a bundle may hold fetched ahead of what it has sent."""
    max_range: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    """Largest coalesced Range read (one extent larger than this still gets its own)."""
    max_gap: int = attrs.field(default=64 * 1024, validator=_not_negative)
    """Unneeded bytes between two extents that one Range read may read through."""
    notify_jobs: int = attrs.field(default=3, validator=_positive)
    """Layers scanned at once by one notify."""
    registry_retries: int = attrs.field(default=4, validator=_not_negative)
    registry_timeout: float = attrs.field(default=30.0, validator=_positive)

    @port.validator
    def _check_port(self, _: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value <= 65535:
            raise InvalidInput(f"port must be 0..65535, not {value}")

    def __attrs_post_init__(self) -> None:
        if self.log_level not in _LOG_LEVELS:
            raise InvalidInput(
                f"log_level must be one of {', '.join(sorted(_LOG_LEVELS))}, not {self.log_level!r}"
            )
        if not self.database:
            raise InvalidInput("database must not be empty")
        domains = [registry.domain for registry in self.registries]
        if len(set(domains)) != len(domains):
            raise InvalidInput("each registry host may appear once in [[registries]]")

    def registry_for(self, domain: str) -> UpstreamRegistry | None:
        for registry in self.registries:
            if registry.domain == domain:
                return registry
        return None


wire.register(UpstreamRegistry, forbid_extra_keys=True)
wire.register(BasicUser, forbid_extra_keys=True)
wire.register(AuthConfig, forbid_extra_keys=True)
wire.register(ProxyConfig, forbid_extra_keys=True)

_SCALARS: Final = {
    field.name: field.type.__name__
    for field in attrs.fields(attrs.resolve_types(ProxyConfig))
    if field.type in (str, int, bool, float)
}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, kind in _SCALARS.items():
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is None:
            continue
        variable = ENV_PREFIX + name.upper()
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered not in _TRUE | _FALSE:
                raise InvalidInput(f"{variable}={raw!r}: expected true or false")
            values[name] = lowered in _TRUE
        elif kind == "int":
            try:
                values[name] = int(raw)
            except ValueError:
                raise InvalidInput(f"{variable}={raw!r}: expected an integer") from None
        elif kind == "float":
            try:
                values[name] = float(raw)
            except ValueError:
                raise InvalidInput(f"{variable}={raw!r}: expected a number") from None
        else:
            values[name] = raw
    return values


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> ProxyConfig:
    """Read the config file, apply the environment, then ``overrides`` (flags; ``None`` values
    are ignored). Errors are ``InvalidInput`` naming the file and the key."""
    environ = os.environ if environ is None else environ
    explicit = path if path is not None else environ.get(ENV_PREFIX + "CONFIG")
    file = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    data: dict[str, Any] = {}
    try:
        data = tomllib.loads(file.read_text())
    except FileNotFoundError:
        if explicit:
            raise InvalidInput(f"proxy config {file} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read proxy config {file}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"proxy config {file} is not valid TOML: {exc}") from exc
    data.update(_from_env(environ))
    data.update({key: value for key, value in overrides.items() if value is not None})
    return wire.structure(data, ProxyConfig, f"proxy config {file}")
