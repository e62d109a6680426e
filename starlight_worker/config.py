"""The daemon's configuration: ``/etc/starlight/daemon.toml``, then environment, then flags.

Example (every key optional; these are the defaults)::

    proxy = "http://127.0.0.1:8090"
    proxy_user = ""                         # "user:password" if the proxy requires it
    root = "/var/lib/starlight"             # layers, snapshots, the FUSE mount, the database
    run_dir = "/run/starlight"              # snapshotter.sock, daemon.sock, fused.sock
    containerd_address = "/run/containerd/containerd.sock"
    namespace = "default"                   # containerd namespace for pulls
    content_timeout = 300                   # a read of content that cannot arrive fails (EIO)
    pull_retries = 5                        # reconnects of one pull before giving up
    retry_backoff_max = 60                  # longest wait between background retries of a pull
    remote_timeout = 120                    # remote-snapshot Prepare: wait for the header
    detach_after = 30                       # a complete layer unused this long leaves FUSE
    metrics_address = ""                    # HOST:PORT serving GET /metrics ("": none)
    log_level = "info"

Environment variables ``STARLIGHT_<KEY>`` (upper case) override the file; flags override both.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import attrs

from starlight_core.errors import InvalidInput

__all__ = ["DEFAULT_CONFIG_PATH", "DaemonConfig", "load_config"]

DEFAULT_CONFIG_PATH = Path("/etc/starlight/daemon.toml")


@attrs.frozen
class DaemonConfig:
    proxy: str = "http://127.0.0.1:8090"
    proxy_user: str = attrs.field(default="", repr=False)
    root: Path = attrs.field(default=Path("/var/lib/starlight"), converter=Path)
    run_dir: Path = attrs.field(default=Path("/run/starlight"), converter=Path)
    containerd_address: str = "/run/containerd/containerd.sock"
    namespace: str = "default"
    content_timeout: float = 300.0
    pull_retries: int = 5
    retry_backoff_max: float = 60.0
    """A pull that fails after its image is ready (containers may run on it) is retried in
    the background forever, waiting longer each time, at most this many seconds."""
    remote_timeout: float = 120.0
    """Seconds a remote-snapshot Prepare waits for the bundle header before declining."""
    detach_after: float = 30.0
    """Seconds a complete layer no mount uses stays attached to FUSE before the reaper
    detaches it."""
    metrics_address: str = ""
    """``HOST:PORT`` where the daemon serves Prometheus metrics (``GET /metrics``)."""
    log_level: str = "info"

    @property
    def snapshotter_socket(self) -> Path:
        return self.run_dir / "snapshotter.sock"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "daemon.sock"

    @property
    def fused_socket(self) -> Path:
        return self.run_dir / "fused.sock"

    @property
    def fuse_mountpoint(self) -> Path:
        # Under the same root as the snapshot directories: containerd shortens long overlay
        # option strings only when every lowerdir shares a common parent.
        return self.root / "fuse"

    @property
    def snapshotter_root(self) -> Path:
        return self.root / "snapshotter"


_FIELDS = {f.name: f for f in attrs.fields(DaemonConfig)}


def _coerce(name: str, value: Any) -> Any:
    kind = _FIELDS[name].default
    try:
        if isinstance(kind, bool):
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if isinstance(kind, int) and not isinstance(kind, bool):
            return int(value)
        if isinstance(kind, float):
            return float(value)
    except ValueError:
        raise InvalidInput(f"configuration {name}: invalid value {value!r}") from None
    return value


def load_config(path: Path | None = None, **overrides: Any) -> DaemonConfig:
    values: dict[str, Any] = {}
    file = path or Path(os.environ.get("STARLIGHT_DAEMON_CONFIG", DEFAULT_CONFIG_PATH))
    if file.is_file():
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidInput(f"cannot read {file}: {exc}") from exc
        unknown = set(data) - set(_FIELDS)
        if unknown:
            raise InvalidInput(f"{file}: unknown keys {', '.join(sorted(unknown))}")
        values.update(data)
    elif path is not None:
        raise InvalidInput(f"configuration file {path} does not exist")
    for name in _FIELDS:
        env = os.environ.get(f"STARLIGHT_{name.upper()}")
        if env is not None:
            values[name] = env
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DaemonConfig(**{k: _coerce(k, v) for k, v in values.items()})
