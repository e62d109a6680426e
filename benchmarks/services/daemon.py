"""A private ``starlight-daemon`` (and the FUSE server it starts) for tests and benchmarks.

The store lives under ``workdir/root``; sockets go to a short directory under ``/tmp`` (unix
socket paths are limited to 108 bytes). ``stop()`` stops the daemon; ``close()`` also detaches
every layer from the FUSE server, shuts it down and unmounts what is left, so nothing survives
the test. ``kill()`` is a ``kill -9`` of the daemon alone (the FUSE server keeps running), as a
crash would be; ``start()`` again is the restart. ``metrics=True`` serves the daemon's
Prometheus metrics on a free loopback port (``metric(name, **labels)`` reads one). ``netns``
runs the daemon (and the FUSE server it starts) inside that network namespace
(``benchmarks.wan``); only the network namespace changes, mounts stay shared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Final

from benchmarks.services import free_port
from benchmarks.services.process import ServiceProcess
from benchmarks.wan.netns import netns_argv

__all__ = ["DaemonProcess"]

_START_TIMEOUT: Final = 60.0


def _binary() -> str:
    candidate = Path(sys.executable).with_name("starlight-daemon")
    if candidate.exists():
        return str(candidate)
    raise FileNotFoundError(f"{candidate} not found: pip install -e ./starlight_worker")


class DaemonProcess(ServiceProcess):
    name = "starlight-daemon"

    def __init__(
        self,
        workdir: Path,
        *,
        proxy: str,
        containerd_address: str,
        namespace: str = "default",
        content_timeout: float = 60.0,
        extra: dict[str, str] | None = None,
        netns: str | None = None,
        metrics: bool = False,
    ) -> None:
        self.workdir = Path(workdir).absolute()
        self.netns = netns
        self.root = self.workdir / "root"
        self.run_dir = Path(tempfile.mkdtemp(prefix="sl-", dir="/tmp"))
        self.proxy = proxy
        self.containerd_address = containerd_address
        self.namespace = namespace
        self.content_timeout = content_timeout
        self.extra = dict(extra or {})
        self.metrics_port = free_port() if metrics else None
        super().__init__(self.workdir / "daemon.log")
        self.config_path = self.workdir / "daemon.toml"

    @property
    def snapshotter_socket(self) -> str:
        return str(self.run_dir / "snapshotter.sock")

    @property
    def control_socket(self) -> str:
        return str(self.run_dir / "daemon.sock")

    @property
    def fused_socket(self) -> str:
        return str(self.run_dir / "fused.sock")

    @property
    def fuse_mountpoint(self) -> Path:
        return self.root / "fuse"

    def _write_config(self) -> None:
        lines = {
            "proxy": self.proxy,
            "root": str(self.root),
            "run_dir": str(self.run_dir),
            "containerd_address": self.containerd_address,
            "namespace": self.namespace,
            "content_timeout": self.content_timeout,
            "log_level": "debug",
            **(
                {"metrics_address": f"127.0.0.1:{self.metrics_port}"}
                if self.metrics_port is not None
                else {}
            ),
            **self.extra,
        }
        text = "".join(
            f"{key} = {value!r}\n" if isinstance(value, float) else f'{key} = "{value}"\n'
            for key, value in lines.items()
        )
        self.config_path.write_text(text)

    def start(self) -> None:
        if self.running:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("STARLIGHT_")}
        self._spawn(netns_argv(self.netns, [_binary(), "--config", str(self.config_path)]), env=env)
        self._wait_ready(self._answers, timeout=_START_TIMEOUT, what="starlight-daemon")

    def _answers(self) -> bool:
        """The control socket accepts connections (after a kill, a stale socket file stays
        until the new daemon replaces it)."""
        self._check_alive()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            try:
                sock.connect(self.control_socket)
            except OSError:
                return False
        return True

    def kill(self) -> None:
        """``kill -9`` the daemon (only the daemon: the FUSE server is its own session)."""
        self._terminate(signal.SIGKILL)

    def close(self) -> None:
        """Stop everything: the daemon, the FUSE server, and any mount left."""
        self.stop()
        from starlight_worker.fs import FsClient

        client = FsClient(self.fused_socket, timeout=10)
        with contextlib.suppress(Exception):
            for layer in client.list():
                client.detach(layer.layer_key)
            pid = client.ping().pid
            try:
                client.shutdown()
            except Exception:
                os.kill(pid, signal.SIGKILL)
        subprocess.run(
            ["fusermount3", "-uz", str(self.fuse_mountpoint)],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def metric(self, name: str, **labels: str) -> float:
        """The current value of one sample of the daemon's metrics (0 when absent)."""
        if self.metrics_port is None:
            raise RuntimeError("start the daemon with metrics=True")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        wanted = name + (
            "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
        )
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == wanted:
                return float(value)
        return 0.0
