"""A private ``starlight-proxy`` process: its own config file, database and port.

``ProxyProcess(workdir, registries=[...])`` writes ``workdir/proxy.toml``, runs the
``starlight-proxy`` of this environment on a free loopback port and waits until
``/health-check`` answers. ``database`` defaults to a SQLite file in ``workdir``; pass a
``postgresql://`` URL to run replicas on one database. ``pid`` lets benchmarks read its CPU
time and memory from ``/proc``. ``netns`` runs it inside that network namespace
(``benchmarks.wan``), listening on ``listen``; its readiness is checked from inside too.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks.services import free_port
from benchmarks.services.process import ServiceProcess
from benchmarks.wan.netns import call_in_netns, netns_argv

__all__ = ["ProxyProcess", "proxy_binary", "render_toml"]

_START_TIMEOUT: Final = 60.0


def proxy_binary() -> str:
    """The ``starlight-proxy`` script installed next to this interpreter."""
    candidate = Path(sys.executable).with_name("starlight-proxy")
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"{candidate} not found: pip install -e ./starlight_proxy")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def render_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Enough TOML for a proxy config: scalars, arrays, tables and arrays of tables."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            tables.append(f"[{name}]\n" + render_toml(value, f"{name}."))
        elif isinstance(value, list | tuple) and value and isinstance(value[0], Mapping):
            for item in value:
                tables.append(f"[[{name}]]\n" + render_toml(item, f"{name}."))
        else:
            lines.append(f"{key} = {_value(value)}")
    return "\n".join(lines + tables) + "\n"


class ProxyProcess(ServiceProcess):
    name = "starlight-proxy"
    stop_timeout = 15.0

    def __init__(
        self,
        workdir: Path,
        *,
        registries: Sequence[Mapping[str, Any]] = (),
        database: str | None = None,
        auth: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        netns: str | None = None,
        listen: str = "127.0.0.1",
    ) -> None:
        self.workdir = Path(workdir)
        self.netns = netns
        self.listen = listen
        self.port = port if port is not None else free_port()
        self.database = database or str(self.workdir / "metadata.db")
        self.config_path = self.workdir / "proxy.toml"
        super().__init__(self.workdir / "proxy.log")
        self._config: dict[str, Any] = {
            "listen": listen,
            "port": self.port,
            "database": self.database,
            "log_level": "warning",
            **(settings or {}),
        }
        if registries:
            self._config["registries"] = [dict(r) for r in registries]
        if auth:
            self._config["auth"] = dict(auth)
        self._env = dict(env or {})

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}"

    def start(self) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_toml(self._config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("STARLIGHT_PROXY_")}
        env.update(self._env)
        self._spawn(
            netns_argv(self.netns, [proxy_binary(), "--config", str(self.config_path)]),
            env=env,
            cwd=self.workdir,
        )
        self._wait_ready(
            lambda: call_in_netns(self.netns, self._answers),
            timeout=_START_TIMEOUT,
            what=f"starlight-proxy on {self.url}",
        )

    def _answers(self) -> bool:
        self._check_alive()
        try:
            with urllib.request.urlopen(f"{self.url}/health-check", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
