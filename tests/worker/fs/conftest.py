"""A real layer filesystem server per test module (or per test where its settings matter)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

from starlight_worker.fs import FsClient, ensure_running
from starlight_worker.fs.mountpoint import is_dead_mount, unmount


@attrs.frozen
class Server:
    client: FsClient
    root: Path
    mountpoint: Path
    socket: Path

    @property
    def log(self) -> str:
        path = Path(f"{self.socket}.log")
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def running_server(root: Path, *, timeout: float = 60.0, poll: float = 0.2) -> Iterator[Server]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing")
    root.mkdir(parents=True, exist_ok=True)
    socket, mountpoint = root / "fs.sock", root / "mnt"
    client = ensure_running(socket, mountpoint, content_timeout=timeout, poll_interval=poll)
    server = Server(client, root, mountpoint, socket)
    try:
        yield server
    finally:
        pid: int | None
        try:
            pid = client.ping().pid
        except Exception:
            pid = None
        try:
            for info in client.list():
                client.detach(info.layer_key)
            client.shutdown()
        except Exception:
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
        # Whatever happened, leave no mount behind for the next test or agent.
        if os.path.ismount(mountpoint) or is_dead_mount(mountpoint):
            unmount(mountpoint, lazy=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the daemon runs anyio on asyncio


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("fused")) as running:
        yield running
