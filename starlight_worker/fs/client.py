"""The daemon's side of the layer filesystem: a control client and ``ensure_running``.

Imports no FUSE. Every call opens its own connection, so a server restart or a dropped
connection costs nothing but that one call; the server never depends on a client.
"""

from __future__ import annotations

import builtins
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

from starlight_core import wire
from starlight_core.errors import DaemonUnavailable, FailedPrecondition
from starlight_worker.fs import protocol
from starlight_worker.fs.mountpoint import is_dead_mount, unmount
from starlight_worker.fs.protocol import Access, AttachedLayerInfo, Request, ServerInfo

__all__ = ["AsyncFsClient", "FsClient", "ensure_running"]

T = TypeVar("T")

_HINT = "the daemon starts it with starlight_worker.fs.ensure_running; see its log"
_spawned: list[subprocess.Popen[bytes]] = []
"""Servers this process started; reaped once they exit, so none lingers as a zombie."""


class FsClient:
    """Synchronous client of one layer filesystem server."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(self, request: Request) -> Any:
        """Send one request; its JSON-shaped result, or the server's error raised."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.socket_path))
                sock.sendall(protocol.encode_request(request))
                with sock.makefile("rb") as reader:
                    line = reader.readline(protocol.MAX_LINE)
        except OSError as exc:
            raise DaemonUnavailable(
                f"layer filesystem server at {self.socket_path} is not answering: {exc}",
                hint=_HINT,
            ) from exc
        if not line.endswith(b"\n"):
            raise DaemonUnavailable(
                f"layer filesystem server at {self.socket_path} closed the connection",
                hint=_HINT,
            )
        return protocol.decode_response(line)

    def ping(self) -> ServerInfo:
        return wire.structure(self.request(Request("ping")), ServerInfo)

    def is_alive(self) -> bool:
        try:
            self.ping()
        except DaemonUnavailable:
            return False
        return True

    def attach(self, layer_key: str, layer_dir: str | os.PathLike[str]) -> Path:
        """Present ``layer_dir`` at ``<mountpoint>/<layer_key>``; idempotent."""
        result = self.request(Request("attach", layer_key, os.fspath(Path(layer_dir).absolute())))
        return Path(result["path"])

    def detach(self, layer_key: str) -> bool:
        return bool(self.request(Request("detach", layer_key))["detached"])

    def arrived(self, layer_key: str, names: Iterable[str]) -> int:
        """Tell waiting readers that these files' contents are in place."""
        return int(self.request(Request("arrived", layer_key, names=tuple(names)))["woken"])

    def list(self) -> builtins.list[AttachedLayerInfo]:
        return wire.structure(self.request(Request("list")), builtins.list[AttachedLayerInfo])

    def trace_on(self) -> None:
        self.request(Request("trace_on"))

    def trace_off(self) -> None:
        self.request(Request("trace_off"))

    def trace_drain(self) -> builtins.list[Access]:
        return wire.structure(self.request(Request("trace_drain")), builtins.list[Access])

    def shutdown(self) -> None:
        """Unmount and stop the server; ``FailedPrecondition`` while the mount is in use."""
        self.request(Request("shutdown"))


class AsyncFsClient:
    """The same calls for async code (anyio/asyncio): each runs in a worker thread."""

    def __init__(self, socket_path: str | os.PathLike[str], *, timeout: float = 120.0) -> None:
        self.sync = FsClient(socket_path, timeout=timeout)

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await anyio.to_thread.run_sync(functools.partial(func, *args))

    async def ping(self) -> ServerInfo:
        return await self._run(self.sync.ping)

    async def is_alive(self) -> bool:
        return await self._run(self.sync.is_alive)

    async def attach(self, layer_key: str, layer_dir: str | os.PathLike[str]) -> Path:
        return await self._run(self.sync.attach, layer_key, layer_dir)

    async def detach(self, layer_key: str) -> bool:
        return await self._run(self.sync.detach, layer_key)

    async def arrived(self, layer_key: str, names: Iterable[str]) -> int:
        return await self._run(self.sync.arrived, layer_key, tuple(names))

    async def list(self) -> builtins.list[AttachedLayerInfo]:
        return await self._run(self.sync.list)

    async def trace_on(self) -> None:
        await self._run(self.sync.trace_on)

    async def trace_off(self) -> None:
        await self._run(self.sync.trace_off)

    async def trace_drain(self) -> builtins.list[Access]:
        return await self._run(self.sync.trace_drain)

    async def shutdown(self) -> None:
        await self._run(self.sync.shutdown)


def ensure_running(
    socket_path: str | os.PathLike[str],
    mountpoint: str | os.PathLike[str],
    *,
    content_timeout: float | None = None,
    poll_interval: float | None = None,
    log_path: str | os.PathLike[str] | None = None,
    python: str | None = None,
    startup_timeout: float = 30.0,
    env: Mapping[str, str] | None = None,
) -> FsClient:
    """A client of the server at ``socket_path``, starting one (detached) if none answers.

    A dead FUSE mount left at ``mountpoint`` by a crashed server is lazily unmounted first.
    The server's output goes to ``log_path`` (default: the socket path + ``.log``).
    """
    socket_path = Path(socket_path).absolute()
    mountpoint = Path(mountpoint).absolute()
    client = FsClient(socket_path)
    _reap()
    if _check(client, mountpoint):
        return client

    if is_dead_mount(mountpoint):
        unmount(mountpoint, lazy=True)
    argv = [
        python or sys.executable, "-m", "starlight_worker.fs",
        "--socket", str(socket_path), "--mountpoint", str(mountpoint),
    ]  # fmt: skip
    if content_timeout is not None:
        argv += ["--timeout", str(content_timeout)]
    if poll_interval is not None:
        argv += ["--poll", str(poll_interval)]
    log_file = Path(log_path) if log_path is not None else Path(f"{socket_path}.log")
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log, open(os.devnull, "rb") as devnull:
        process = subprocess.Popen(
            argv,
            stdin=devnull,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # our restarts and signals must not reach it
            close_fds=True,
            cwd="/",
            env=dict(env) if env is not None else None,
        )
    _spawned.append(process)

    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if _check(client, mountpoint):
            return client
        code = process.poll()
        # Another server won the race for this socket: wait for that one to answer.
        if code is not None and code != protocol.EXIT_ALREADY_RUNNING:
            raise DaemonUnavailable(
                f"layer filesystem server exited with status {code}: {_tail(log_file)}",
                hint=f"see {log_file}",
            )
        time.sleep(0.05)
    raise DaemonUnavailable(
        f"layer filesystem server did not answer at {socket_path} within {startup_timeout:g}s",
        hint=f"see {log_file}",
    )


def _check(client: FsClient, mountpoint: Path) -> bool:
    try:
        info = client.ping()
    except DaemonUnavailable:
        return False
    if Path(info.mountpoint) != mountpoint:
        raise FailedPrecondition(
            f"the server at {client.socket_path} serves {info.mountpoint}, not {mountpoint}"
        )
    return True


def _reap() -> None:
    _spawned[:] = [p for p in _spawned if p.poll() is None]


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return "(no log)"
    return data.decode(errors="replace").strip() or "(empty log)"
