"""Serving on a real unix socket: in-process with anyio, and as ``python -m``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from benchmarks.services import wait_for
from starlight_worker.api import snapshots_grpc
from starlight_worker.snapshotter import Snapshotter, serve_snapshots, snapshots_server
from tests.worker.snapshotter.support import Client, raises_status

pytestmark = pytest.mark.anyio


async def test_serves_on_unix_socket(snapshotter: Snapshotter, tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "snapshotter.sock")
    async with snapshots_server(snapshotter, path):
        assert os.stat(path).st_mode & 0o777 == 0o600
        channel = Channel(path=path)
        try:
            client = Client(snapshots_grpc.SnapshotsStub(channel))
            await client.prepare("a")
            await client.commit("c", "a")
            assert [i.name for i in await client.walk()] == ["c"]
            with raises_status(Status.NOT_FOUND):
                await client.stat("a")
            health = await HealthStub(channel).Check(HealthCheckRequest())
            assert health.status == HealthCheckResponse.SERVING
        finally:
            channel.close()
    assert not os.path.exists(path)


async def test_replaces_a_stale_socket(snapshotter: Snapshotter, tmp_path: Path) -> None:
    path = str(tmp_path / "snapshotter.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # a socket file nobody listens on, as after a crash
    async with anyio.create_task_group() as tg:
        assert await tg.start(serve_snapshots, snapshotter, path) == path
        channel = Channel(path=path)
        try:
            await Client(snapshots_grpc.SnapshotsStub(channel)).prepare("a")
        finally:
            channel.close()
        tg.cancel_scope.cancel()


async def test_refuses_to_replace_a_regular_file(snapshotter: Snapshotter, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        async with snapshots_server(snapshotter, str(path)):
            pass
    assert path.read_text() == "precious"


def test_module_entry_point(tmp_path: Path) -> None:
    path = tmp_path / "snapshotter.sock"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "starlight_worker.snapshotter",
            "--root",
            str(tmp_path / "root"),
            "--address",
            str(path),
        ],
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(path.exists, timeout=60, what="python -m starlight_worker.snapshotter")

        async def use() -> list[str]:
            channel = Channel(path=str(path))
            try:
                client = Client(snapshots_grpc.SnapshotsStub(channel))
                await client.view("v")
                return [i.name for i in await client.walk()]
            finally:
                channel.close()

        assert anyio.run(use, backend="asyncio") == ["v"]
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr.decode()
        assert not path.exists()
        assert (tmp_path / "root" / "metadata.db").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
