"""The CLI's configuration: a TOML file, overridden by environment variables, then flags.

Files read (first found wins): ``$STARLIGHT_CLI_CONFIG``, ``~/.config/starlight/cli.toml``,
``/etc/starlight/cli.toml``. Keys::

    proxy = "http://proxy.example:8090"    # where notify/ping/report go
    proxy_user = "user:password"           # optional client credentials for the proxy
    daemon_socket = "/run/starlight/daemon.sock"

Environment: ``STARLIGHT_PROXY``, ``STARLIGHT_PROXY_USER``, ``STARLIGHT_DAEMON_SOCKET``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import attrs

from starlight_core.errors import InvalidInput

__all__ = ["DEFAULT_DAEMON_SOCKET", "CliConfig", "load_config"]

DEFAULT_DAEMON_SOCKET = "/run/starlight/daemon.sock"


@attrs.frozen
class CliConfig:
    proxy: str | None = None
    proxy_user: str | None = attrs.field(default=None, repr=False)
    daemon_socket: str = DEFAULT_DAEMON_SOCKET


def _candidates() -> list[Path]:
    explicit = os.environ.get("STARLIGHT_CLI_CONFIG")
    if explicit:
        return [Path(explicit)]
    return [Path.home() / ".config/starlight/cli.toml", Path("/etc/starlight/cli.toml")]


def load_config(**overrides: str | None) -> CliConfig:
    values: dict[str, str] = {}
    for path in _candidates():
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise InvalidInput(f"cannot read {path}: {exc}") from exc
            unknown = set(data) - {f.name for f in attrs.fields(CliConfig)}
            if unknown:
                raise InvalidInput(f"{path}: unknown keys {', '.join(sorted(unknown))}")
            values.update({k: str(v) for k, v in data.items()})
            break
    for key in ("proxy", "proxy_user", "daemon_socket"):
        env = os.environ.get(f"STARLIGHT_{key.upper()}")
        if env:
            values[key] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CliConfig(**values)
