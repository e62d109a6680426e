"""Fixtures: a snapshotter in a private directory and a client talking to it through gRPC
(grpclib's in-memory ``ChannelFor``: the real codec, status codes and streaming)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from grpclib.testing import ChannelFor

from starlight_worker.api import snapshots_grpc
from starlight_worker.snapshotter import SnapshotsService, Snapshotter
from tests.worker.snapshotter.support import Client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpclib runs on asyncio only


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "root"


@pytest.fixture
def snapshotter(root: Path) -> Iterator[Snapshotter]:
    instance = Snapshotter(str(root))
    yield instance
    instance.close()


@pytest.fixture
async def client(snapshotter: Snapshotter) -> AsyncIterator[Client]:
    async with ChannelFor([SnapshotsService(snapshotter)]) as channel:
        yield Client(snapshots_grpc.SnapshotsStub(channel))
