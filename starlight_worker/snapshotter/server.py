"""Serving gRPC services on a unix socket, from anyio code (grpclib needs asyncio underneath).

``listening`` (an async context manager) and ``serve_unix`` (a task) are the building blocks
the daemon can use for its control API too; ``serve_snapshots`` / ``snapshots_server`` serve
one snapshotter where containerd's ``proxy_plugins`` entry points; ``run`` is a blocking entry
point (``python -m starlight_worker.snapshotter``).

The tasks run until cancelled and report the socket path through ``task_status``, so
``await task_group.start(serve_snapshots, snapshotter, path)`` returns once the socket accepts
connections.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
from collections.abc import AsyncIterator, Collection

import anyio
from anyio.abc import TaskStatus
from grpclib._typing import IServable
from grpclib.health.service import Health
from grpclib.server import Server

from starlight_worker.snapshotter.service import SnapshotsService
from starlight_worker.snapshotter.snapshotter import Snapshotter

__all__ = ["listening", "run", "serve_snapshots", "serve_unix", "snapshots_server"]

log = logging.getLogger(__name__)


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


@contextlib.asynccontextmanager
async def listening(services: Collection[IServable], path: str) -> AsyncIterator[str]:
    """Serve ``services`` on the unix socket ``path`` (mode 0600) inside the block; the socket
    is removed afterwards. Errors while starting (path taken by a non-socket, bind failure)
    are raised as they are."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_stale_socket(path)
    server = Server(services)
    await server.start(path=path)
    try:
        os.chmod(path, 0o600)  # only root (containerd, the CLI) talks to us
        log.info("serving %s on %s", ", ".join(type(s).__name__ for s in services), path)
        yield path
    finally:
        server.close()
        with anyio.CancelScope(shield=True):
            await server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def serve_unix(
    services: Collection[IServable],
    path: str,
    *,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``services`` on the unix socket ``path`` until cancelled (a task)."""
    async with listening(services, path):
        task_status.started(path)
        await anyio.sleep_forever()


def _snapshot_services(snapshotter: Snapshotter) -> list[IServable]:
    return [SnapshotsService(snapshotter), Health()]


async def serve_snapshots(
    snapshotter: Snapshotter,
    path: str,
    *,
    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the Snapshots service (and gRPC health) for ``snapshotter`` on ``path``."""
    await serve_unix(_snapshot_services(snapshotter), path, task_status=task_status)


def snapshots_server(
    snapshotter: Snapshotter, path: str
) -> contextlib.AbstractAsyncContextManager[str]:
    """``async with snapshots_server(s, path):`` — serving inside the block."""
    return listening(_snapshot_services(snapshotter), path)


def run(root: str, path: str) -> None:
    """Serve a snapshotter rooted at ``root`` on ``path`` until interrupted (blocking)."""

    async def main() -> None:
        snapshotter = Snapshotter(root)
        try:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with anyio.create_task_group() as tg:
                    await tg.start(serve_snapshots, snapshotter, path)
                    async for _ in signals:
                        tg.cancel_scope.cancel()
                        break
        finally:
            snapshotter.close()

    anyio.run(main, backend="asyncio")
